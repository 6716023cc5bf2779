"""The digits testbed: its teachers' and classifier's trainers, quickstart, from-scratch script, ablation and
reports."""

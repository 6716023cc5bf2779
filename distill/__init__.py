"""Entry scripts and training machinery: the only package that sees argparse/YAML and the Accelerator."""

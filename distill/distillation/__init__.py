"""Stage two, distillation: the student, teacher-built discriminator, pair data, G / D / Dreg phases, validation and
model card."""

"""Training machinery shared by the stage-two scripts (EMA, per-step seeds, data order)."""

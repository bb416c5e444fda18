"""Method stages beyond training: pseudo-labels (and, later, the RETAB and CAM baselines)."""

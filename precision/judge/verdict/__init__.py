"""Stage 3, judge: rules from a measured row and its context to a verdict, and the
diagnoses that explain one (a moved position bucket)."""

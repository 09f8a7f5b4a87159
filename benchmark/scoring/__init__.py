"""Scoring: turning what an attack produced into numbers and verdicts (reconstruction metrics and the
recognisability rule, the oracle and the class-representative leak rule, SSIM)."""

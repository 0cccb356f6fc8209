"""Encryption schemes: Liu (real-valued, fast, not IND-CPA), CKKS (TenSEAL), FDH-OPE."""

"""Secure split fine-tuning: client/server split, enclave, one-time-pad masking, trainable parts."""

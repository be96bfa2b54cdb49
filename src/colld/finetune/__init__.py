"""Fine-tuning an encoder end to end with a CTC head (``colld finetune --task ctc``)."""

"""Training data: JSONL samples read and checked, /think blocks, chat templates and masks, packing, the audit."""

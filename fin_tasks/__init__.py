"""Financial-task fine-tuning pipeline."""

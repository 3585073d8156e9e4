"""Training engine: one loop for pretraining and fine-tuning (see ``trainer.train``)."""

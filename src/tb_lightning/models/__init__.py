"""Models: the network builder (AlexNet + head, weights), metrics, the LightningModule."""

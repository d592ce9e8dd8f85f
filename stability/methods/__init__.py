"""How a run trains its weights: the training methods (strong tickets, NEq)."""

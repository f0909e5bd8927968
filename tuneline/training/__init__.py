"""The training engine every training run uses: Trainer set-up, callbacks, the chunked loss, torchrun."""

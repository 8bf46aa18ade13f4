from trainer.main import entrypoint

entrypoint()

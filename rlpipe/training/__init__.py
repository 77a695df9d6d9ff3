"""The learner's side of the core: Tinker's training primitives on a peft LoRA model.

    client.py       TrainingClient: forward_backward, optim_step, save_state, load_state, ...
    lora.py         which layers LoRA goes on, and SharedBase: one base model, many adapters
    forward.py      target logprobs per micro-batch (packing.py lays out the rows,
                    attention.py runs variable-length attention)
    checkpoint.py   the on-disk formats: PEFT adapter directories and full training state
    hyperparams.py  the LoRA learning-rate rule of thumb and schedules
    service.py      ServiceClient, Tinker's entry point
    api_future.py   APIFuture, what every call returns
"""

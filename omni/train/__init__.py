"""The shared training core, one module per concern (docs/design.md):

  stage.py   what a stage supplies to the loop (`Stage`), and the loaders the loop and stages share
  optim.py   AdamW and the warmup-cosine schedule, rebuilt from the config on resume
  state.py   what a checkpoint holds (`Trainer`: payload, save, restore) and the resume search
  loop.py    build_trainer, train, train_step, validate, run_loop
  main.py    trainer_main: the command line of every train_*.py script

Logging (omni/logs.py) and the one-line error frame (omni/cli.py) sit lower: the data code and
infer.py use them without the loop.
"""

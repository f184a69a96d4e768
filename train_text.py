"""Stage A: train the Thinker language model. See docs/stage_a_thinker.md."""
from omni.stages.text import TextStage
from omni.train.main import trainer_main

if __name__ == "__main__":
    trainer_main(TextStage)

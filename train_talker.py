"""Stage D: train the RVQ speech codec, then the Talker on its codes. See docs/stage_d_talker.md."""
from omni.stages.talker import TalkerStage
from omni.train.main import trainer_main

if __name__ == "__main__":
    trainer_main(TalkerStage)

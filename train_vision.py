"""Stage C: train the ViT vision encoder contrastively against captions. See docs/stage_c_vision.md."""
from omni.stages.vision import VisionStage
from omni.train.main import trainer_main

if __name__ == "__main__":
    trainer_main(VisionStage)

"""Stage E: multimodal SFT of the Thinker with audio and vision projectors. See docs/stage_e_sft.md."""
from omni.stages.omni_sft import OmniSFTStage
from omni.train.main import trainer_main

if __name__ == "__main__":
    trainer_main(OmniSFTStage)

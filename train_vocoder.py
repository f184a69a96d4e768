"""Stage F: train the neural vocoder (log-mel -> waveform). See docs/stage_f_vocoder.md."""
from omni.stages.vocoder import VocoderStage
from omni.train.main import trainer_main

if __name__ == "__main__":
    trainer_main(VocoderStage)

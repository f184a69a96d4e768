"""Stage B: train the audio encoder as a CTC speech recognizer. See docs/stage_b_audio.md."""
from omni.stages.audio_enc import AudioEncStage
from omni.train.main import trainer_main

if __name__ == "__main__":
    trainer_main(AudioEncStage)

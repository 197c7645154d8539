"""gptscale.train whose save at a stop fails (a test's fault injection: a disk that fills up just then), to
check that the run says which checkpoint it will resume from. The disk fills when the stop save begins, not
when the signal arrives: a periodic save between the two would otherwise fail as an ordinary save."""

from gptscale.checkpoint import checkpointer
from gptscale.train.__main__ import main
from gptscale.train.trainer import Trainer


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


save_at_stop = Trainer.save_at_stop


def fill_the_disk_and_save_at_stop(self):
    checkpointer.write_shards = no_space
    save_at_stop(self)


if __name__ == "__main__":  # not in the helper processes a save spawns
    Trainer.save_at_stop = fill_the_disk_and_save_at_stop
    main()

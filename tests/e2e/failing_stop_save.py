"""gptscale.train whose saves fail once a stop signal has arrived (a test's fault injection: a disk that fills
up just then), to check that the run says which checkpoint it will resume from."""

from gptscale.checkpoint import checkpointer
from gptscale.train.__main__ import main
from gptscale.train.preemption import StopRequest


def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")


handle = StopRequest._handle


def handle_and_fill_the_disk(self, signum, frame):
    handle(self, signum, frame)
    checkpointer.write_shards = no_space


if __name__ == "__main__":  # not in the helper processes a save spawns
    StopRequest._handle = handle_and_fill_the_disk
    main()

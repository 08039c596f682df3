"""The smallest run of a script that still does everything once (CPU, 4 environments, 8 steps, 2 minibatches, 1
epoch, no periodic evaluation, 1 s episodes): the command-line tests' common arguments."""

TINY = [
    "--device",
    "cpu",
    "--num-envs",
    "4",
    "--num-steps",
    "8",
    "--num-minibatches",
    "2",
    "--update-epochs",
    "1",
    "--eval-interval",
    "0",
    "--episode-length-s",
    "1.0",
]

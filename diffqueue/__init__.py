"""diffqueue: a Redis queue of text-to-image jobs turned into images on GPUs.

`diffqueue.producer` is the client SDK; `diffqueue.worker` is the GPU service; `diffqueue.cli` the CLI.
"""

__version__ = "0.1.0"

"""``python -m jaxrlhf.bench``: throughput and MFU of every step (see ``jaxrlhf.bench.steps``)."""

from jaxrlhf.bench.steps import main

if __name__ == "__main__":
    main()

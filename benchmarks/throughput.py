"""Throughput per method, fp32 and bf16-mixed, and Lightning's overhead over a bare loop.

The measurement is ``benchmarks/train_step.py`` (same options); this entry point exists under
the name the operations docs use: ``python benchmarks/throughput.py [--size 208 160 --width 32]``.
"""

from train_step import main  # benchmarks/ is on sys.path when this file is run as a script

if __name__ == "__main__":
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    main()

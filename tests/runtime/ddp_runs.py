"""Run under torchrun by tests/runtime/test_distributed.py, so the multi-process checks cost few launches:

    ddp_runs.py train OUT CONFIGS.json   trains every config of CONFIGS.json ({name: [kind, raw config]}, kind
                                         "diffusion" or "vae") into OUT/name, one after another
    ddp_runs.py cli ARGV.json            runs each argv of ARGV.json (a list) through ``elucidate.cli.main``

Both join the process group once; every trainer and command sees it joined and leaves it as it is.
"""
import json
import sys
from pathlib import Path

from elucidate.cli import main
from elucidate.config import parse_config
from elucidate.runtime.distributed import process_group
from elucidate.training import Trainer, train_vae

with process_group():
    if sys.argv[1] == "train":
        out = Path(sys.argv[2])
        for name, (kind, raw) in json.loads(Path(sys.argv[3]).read_text()).items():
            if kind == "vae":
                train_vae(raw, out / name, progress=False)
            else:
                Trainer(parse_config(raw), out / name, progress=False, log=lambda *a: None).train()
    else:
        for argv in json.loads(Path(sys.argv[2]).read_text()):
            code = main([str(a) for a in argv])
            if code:
                sys.exit(code)

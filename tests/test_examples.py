"""examples/: a few small LR inputs that scripts/make_examples.py regenerates pixel for pixel."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bimacosr.smoke import photo
from tests.conftest import REPO

EXAMPLES = REPO / "examples"


def test_examples_are_few_small_pngs_at_a_quarter_of_the_photographs():
    files = sorted(EXAMPLES.glob("*.png"))
    assert 3 <= len(files) <= 5
    assert sum(f.stat().st_size for f in files) <= 300 * 1024
    for f in files:
        h, w = photo(f.stem).shape[:2]
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (w // 4, h // 4)


@pytest.mark.slow
def test_make_examples_regenerates_them(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts/make_examples.py"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    assert made == sorted(p.name for p in EXAMPLES.glob("*.png"))
    for name in made:
        new, old = (np.asarray(Image.open(folder / name)) for folder in (tmp_path, EXAMPLES))
        assert new.shape == old.shape, name
        differ = int((new != old).any(axis=2).sum())
        assert differ == 0, f"{name}: {differ} of {old.shape[0] * old.shape[1]} pixels differ"

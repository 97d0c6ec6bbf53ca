"""The trigger gallery renders a PNG with a row per attack."""
from PIL import Image

from attacks import ATTACKS
from bench.cli import main


def test_gallery_png(tmp_path):
    out = tmp_path / "g.png"
    assert main(["gallery", "--dataset", "digits", "--out", str(out), "--examples", "1"]) == 0
    with Image.open(out) as im:
        w, h = im.size
    assert w > 200 and h > 60 * len(ATTACKS.names())

"""Make assets/fonts/DejaVuSans-subset.ttf, the font `anemone plot` draws PNG text with.

The subset keeps printable ASCII plus the middle dot, the multiplication sign and
the minus sign (about 100 glyphs, ~20 KB instead of ~750 KB), with its kerning
table and without hinting. DejaVu Sans is under the Bitstream Vera license with
public-domain DejaVu changes (see assets/fonts/LICENSE-DejaVu.txt); the subset
keeps the DejaVu name, which the license allows (it forbids only "Bitstream" and
"Vera" in the name of a modified font).

Needs `pip install fonttools` and the Debian package fonts-dejavu-core (2.37).
Usage: python3 scripts/subset_font.py [path/to/DejaVuSans.ttf]
"""

import sys
from pathlib import Path

from fontTools import subset

source = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
out = Path(__file__).resolve().parent.parent / "assets" / "fonts" / "DejaVuSans-subset.ttf"
subset.main([
    source,
    "--unicodes=U+0020-007E,U+00B7,U+00D7,U+2212",
    "--no-hinting",
    "--desubroutinize",
    "--layout-features=",
    "--drop-tables+=GSUB,GPOS,GDEF,MATH,FFTM",
    "--legacy-kern",
    "--name-IDs=*",
    f"--output-file={out}",
])
print(f"wrote {out} ({out.stat().st_size} bytes)")

"""A small chart without dependencies: an RGB pixel buffer, a 5x7 bitmap font, horizontal bar
panels, and a PNG encoder (zlib + struct, per the PNG spec: signature, IHDR, IDAT, IEND).

Text is drawn upper-case (the font has no lower case); each panel scales its bars to its own
largest value and prints the value beside each bar.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

Color = tuple[int, int, int]

WHITE: Color = (255, 255, 255)
BLACK: Color = (20, 20, 20)
GREY: Color = (150, 150, 150)
LIGHT: Color = (232, 232, 232)
BLUE: Color = (52, 101, 164)
ORANGE: Color = (230, 126, 34)
GREEN: Color = (76, 153, 76)
PURPLE: Color = (128, 84, 160)
RED: Color = (190, 50, 50)

# 5x7 glyphs, rows top to bottom, "#" = ink.
_GLYPHS: dict[str, str] = {
    " ": ".....|.....|.....|.....|.....|.....|.....",
    "A": ".###.|#...#|#...#|#####|#...#|#...#|#...#",
    "B": "####.|#...#|#...#|####.|#...#|#...#|####.",
    "C": ".###.|#...#|#....|#....|#....|#...#|.###.",
    "D": "####.|#...#|#...#|#...#|#...#|#...#|####.",
    "E": "#####|#....|#....|####.|#....|#....|#####",
    "F": "#####|#....|#....|####.|#....|#....|#....",
    "G": ".###.|#...#|#....|#.###|#...#|#...#|.####",
    "H": "#...#|#...#|#...#|#####|#...#|#...#|#...#",
    "I": ".###.|..#..|..#..|..#..|..#..|..#..|.###.",
    "J": "..###|...#.|...#.|...#.|...#.|#..#.|.##..",
    "K": "#...#|#..#.|#.#..|##...|#.#..|#..#.|#...#",
    "L": "#....|#....|#....|#....|#....|#....|#####",
    "M": "#...#|##.##|#.#.#|#.#.#|#...#|#...#|#...#",
    "N": "#...#|#...#|##..#|#.#.#|#..##|#...#|#...#",
    "O": ".###.|#...#|#...#|#...#|#...#|#...#|.###.",
    "P": "####.|#...#|#...#|####.|#....|#....|#....",
    "Q": ".###.|#...#|#...#|#...#|#.#.#|#..#.|.##.#",
    "R": "####.|#...#|#...#|####.|#.#..|#..#.|#...#",
    "S": ".####|#....|#....|.###.|....#|....#|####.",
    "T": "#####|..#..|..#..|..#..|..#..|..#..|..#..",
    "U": "#...#|#...#|#...#|#...#|#...#|#...#|.###.",
    "V": "#...#|#...#|#...#|#...#|#...#|.#.#.|..#..",
    "W": "#...#|#...#|#...#|#.#.#|#.#.#|#.#.#|.#.#.",
    "X": "#...#|#...#|.#.#.|..#..|.#.#.|#...#|#...#",
    "Y": "#...#|#...#|.#.#.|..#..|..#..|..#..|..#..",
    "Z": "#####|....#|...#.|..#..|.#...|#....|#####",
    "0": ".###.|#...#|#..##|#.#.#|##..#|#...#|.###.",
    "1": "..#..|.##..|..#..|..#..|..#..|..#..|.###.",
    "2": ".###.|#...#|....#|...#.|..#..|.#...|#####",
    "3": "#####|...#.|..#..|...#.|....#|#...#|.###.",
    "4": "...#.|..##.|.#.#.|#..#.|#####|...#.|...#.",
    "5": "#####|#....|####.|....#|....#|#...#|.###.",
    "6": "..##.|.#...|#....|####.|#...#|#...#|.###.",
    "7": "#####|....#|...#.|..#..|.#...|.#...|.#...",
    "8": ".###.|#...#|#...#|.###.|#...#|#...#|.###.",
    "9": ".###.|#...#|#...#|.####|....#|...#.|.##..",
    ".": ".....|.....|.....|.....|.....|.##..|.##..",
    ",": ".....|.....|.....|.....|.##..|..#..|.#...",
    ":": ".....|.##..|.##..|.....|.##..|.##..|.....",
    ";": ".....|.##..|.##..|.....|.##..|..#..|.#...",
    "/": ".....|....#|...#.|..#..|.#...|#....|.....",
    "(": "...#.|..#..|.#...|.#...|.#...|..#..|...#.",
    ")": ".#...|..#..|...#.|...#.|...#.|..#..|.#...",
    "[": ".###.|.#...|.#...|.#...|.#...|.#...|.###.",
    "]": ".###.|...#.|...#.|...#.|...#.|...#.|.###.",
    "-": ".....|.....|.....|#####|.....|.....|.....",
    "+": ".....|..#..|..#..|#####|..#..|..#..|.....",
    "%": "##...|##..#|...#.|..#..|.#...|#..##|...##",
    "=": ".....|.....|#####|.....|#####|.....|.....",
    "_": ".....|.....|.....|.....|.....|.....|#####",
    "<": "...#.|..#..|.#...|#....|.#...|..#..|...#.",
    ">": ".#...|..#..|...#.|....#|...#.|..#..|.#...",
    "#": ".#.#.|.#.#.|#####|.#.#.|#####|.#.#.|.#.#.",
    "*": ".....|..#..|#.#.#|.###.|#.#.#|..#..|.....",
    "!": "..#..|..#..|..#..|..#..|..#..|.....|..#..",
    "?": ".###.|#...#|....#|...#.|..#..|.....|..#..",
    "'": "..#..|..#..|.#...|.....|.....|.....|.....",
    '"': ".#.#.|.#.#.|.#.#.|.....|.....|.....|.....",
    "|": "..#..|..#..|..#..|..#..|..#..|..#..|..#..",
    "@": ".###.|#...#|#.###|#.#.#|#.###|#....|.###.",
}
_UNKNOWN = "#####|#...#|#...#|#...#|#...#|#...#|#####"
GLYPH_W, GLYPH_H = 5, 7


def _rows(ch: str) -> list[str]:
    return _GLYPHS.get(ch.upper(), _UNKNOWN).split("|")


class Canvas:
    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, color: Color) -> None:
        x0, y0 = max(0, x), max(0, y)
        x1, y1 = min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0 or y1 <= y0:
            return
        row = bytes(color) * (x1 - x0)
        for yy in range(y0, y1):
            start = (yy * self.width + x0) * 3
            self.pixels[start : start + len(row)] = row

    def text(self, x: int, y: int, text: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw ``text`` with its top-left at (x, y); return the x after it."""
        for ch in text:
            for r, row in enumerate(_rows(ch)):
                for c, bit in enumerate(row):
                    if bit == "#":
                        self.rect(x + c * scale, y + r * scale, scale, scale, color)
            x += (GLYPH_W + 1) * scale
        return x

    def png(self) -> bytes:
        raw = bytearray()
        stride = self.width * 3
        for y in range(self.height):
            raw.append(0)  # filter type 0: None
            raw += self.pixels[y * stride : (y + 1) * stride]
        return encode_png(self.width, self.height, bytes(raw))


def text_width(text: str, scale: int = 2) -> int:
    return len(text) * (GLYPH_W + 1) * scale


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def encode_png(width: int, height: int, filtered_rgb: bytes) -> bytes:
    """A truecolour 8-bit PNG from scanlines that already carry their filter byte."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(filtered_rgb, 9))
        + _chunk(b"IEND", b"")
    )


def read_png_header(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ValueError if it is not a PNG we could have written."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# --- the chart ------------------------------------------------------------------------------


@dataclass
class Bar:
    label: str
    value: float | None
    color: Color = BLUE
    note: str = ""  # printed after the value


@dataclass
class Panel:
    title: str
    unit: str
    bars: list[Bar] = field(default_factory=list)


WIDTH = 1000
MARGIN = 16
LABEL_W = 330
ROW_H = 22
BAR_H = 14


def chart(title: str, panels: Sequence[Panel], footer: Sequence[str] = ()) -> bytes:
    height = MARGIN + 26
    for panel in panels:
        height += 30 + ROW_H * max(1, len(panel.bars)) + 10
    height += 18 * len(footer) + MARGIN
    canvas = Canvas(WIDTH, height)
    y = MARGIN
    canvas.text(MARGIN, y, title, BLACK, 2)
    y += 26
    bar_x = MARGIN + LABEL_W
    bar_max_w = WIDTH - bar_x - 200
    for panel in panels:
        canvas.rect(MARGIN, y + 4, WIDTH - 2 * MARGIN, 1, GREY)
        canvas.text(MARGIN, y + 10, f"{panel.title} ({panel.unit})", BLACK, 2)
        y += 30
        values = [b.value for b in panel.bars if b.value is not None]
        top = max(values) if values else 1.0
        if not panel.bars:
            canvas.text(MARGIN, y + 4, "not measured", GREY, 2)
            y += ROW_H
        for bar in panel.bars:
            canvas.text(MARGIN + 8, y + 3, bar.label[:26], BLACK, 2)
            canvas.rect(bar_x, y + 2, bar_max_w, BAR_H, LIGHT)
            if bar.value is None:
                canvas.text(bar_x + 6, y + 3, "N/A", GREY, 2)
            else:
                w = max(1, int(bar_max_w * bar.value / top)) if top > 0 else 1
                canvas.rect(bar_x, y + 2, w, BAR_H, bar.color)
                canvas.text(bar_x + bar_max_w + 8, y + 3, _fmt(bar.value) + bar.note, BLACK, 2)
            y += ROW_H
        y += 10
    for line in footer:
        canvas.text(MARGIN, y, line, GREY, 1 if text_width(line, 2) > WIDTH - 2 * MARGIN else 2)
        y += 18
    return canvas.png()


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}".replace(",", " ")
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def write_chart(path: Path, title: str, panels: Sequence[Panel], footer: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(chart(title, panels, footer))
    return path

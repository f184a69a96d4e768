"""The demo world: vocabulary, scene sampling, text templates and rendering.

A scene is one to three coloured shapes on a plain light background.  Inside one scene all
shapes differ and all colours differ, so "what colour is the circle?" always has exactly one
answer.  Everything here is a pure function of a `random.Random` passed in by the caller.

Text rules (kept tiny so a character-level CTC vocabulary is 26 letters + space):
  * spoken text (ASR/TTS text, speech transcripts): lowercase a-z words and single spaces;
  * written text: the same, and a question ends with "?" (a corpus line may be a question
    followed by its answer: "what is two plus two? four").
Numbers are always words ("three").
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Far apart in RGB so a tiny vision encoder separates them even with per-image jitter.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = {"small": (5, 7), "big": (10, 13)}  # half extent in pixels (inclusive range)
SIZE_NAMES = tuple(SIZES)
RELATIONS = ("above", "below", "left of", "right of")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
           "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
           "eighteen", "nineteen", "twenty")
MAX_OPERAND = 10  # sums use operands zero..ten, so answers stay within zero..twenty
COLOUR_JITTER = 15
GAP = 2  # minimum free pixels between two shapes' bounding boxes

SPOKEN_RE = re.compile(r"^[a-z]+( [a-z]+)*$")
QUESTION_RE = re.compile(r"^[a-z]+( [a-z]+)*\?$")
LINE_RE = re.compile(r"^[a-z]+( [a-z]+)*(\?( [a-z]+)*)?$")


@dataclass
class Obj:
    shape: str
    colour: str
    size: str
    cx: int = 0
    cy: int = 0
    half: int = 0
    rgb: tuple = (0, 0, 0)

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass
class Scene:
    objects: list
    background: tuple
    relation: tuple | None = None  # (subject index, relation word, other index), 2 shapes only
    pairs: tuple = field(init=False)

    def __post_init__(self):
        self.pairs = tuple(sorted((o.colour, o.shape) for o in self.objects))


# ----------------------------------------------------------------------------------------
# Held-out items
# ----------------------------------------------------------------------------------------
def choose_heldout_pairs(rng: random.Random, n: int = 4) -> list:
    """n colour-shape pairs, no two sharing a colour or a shape, so every colour and every
    shape still appears in training with most of its partners."""
    shapes = rng.sample(SHAPES, n)
    colours = rng.sample(COLOUR_NAMES, n)
    return sorted(zip(colours, shapes))


def choose_heldout_sums(rng: random.Random, n: int = 3) -> list:
    """n unordered operand pairs {a, b} (a < b, both 1..10); both orders are held out."""
    pool = [(a, b) for a in range(1, MAX_OPERAND + 1) for b in range(a + 1, MAX_OPERAND + 1)]
    return sorted(rng.sample(pool, n))


def sum_phrases(pairs) -> list:
    """'two plus five' and 'five plus two' for each held-out pair."""
    return sorted({f"{NUMBERS[a]} plus {NUMBERS[b]}" for x, y in pairs for a, b in ((x, y), (y, x))})


def mentions(text: str, phrase: str) -> bool:
    """Whole-word containment, ignoring the question mark."""
    return f" {phrase} " in f" {text.replace('?', ' ')} "


# ----------------------------------------------------------------------------------------
# Scene sampling
# ----------------------------------------------------------------------------------------
def _overlap(a: Obj, b: Obj) -> bool:
    reach = a.half + b.half + GAP
    return abs(a.cx - b.cx) <= reach and abs(a.cy - b.cy) <= reach


def relation_of(a: Obj, b: Obj) -> str | None:
    """Where a is relative to b, or None when the layout is not clear-cut."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    apart = a.half + b.half + GAP
    if abs(dy) > apart and 2 * abs(dx) <= abs(dy):
        return "above" if dy < 0 else "below"
    if abs(dx) > apart and 2 * abs(dy) <= abs(dx):
        return "left of" if dx < 0 else "right of"
    return None


def _try_layout(rng: random.Random, objs: list) -> bool:
    """One attempt at placing all objects; True when the layout is valid and clear."""
    for o in objs:
        o.half = rng.randint(*SIZES[o.size])
        o.cx = rng.randint(o.half + 1, IMAGE_SIZE - 2 - o.half)
        o.cy = rng.randint(o.half + 1, IMAGE_SIZE - 2 - o.half)
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            if _overlap(a, b):
                return False
    if len(objs) == 2:
        return relation_of(objs[0], objs[1]) is not None
    if len(objs) == 3:  # captions list shapes left to right: keep that order visible
        xs = sorted(o.cx for o in objs)
        return xs[1] - xs[0] >= 6 and xs[2] - xs[1] >= 6
    return True


def _jitter(rng: random.Random, rgb: tuple, amount: int) -> tuple:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def sample_scene(rng: random.Random, heldout: list, with_heldout: bool) -> Scene:
    """A random scene.  with_heldout=False: no held-out pair at all (train/val);
    True: at least one held-out pair (test)."""
    n = rng.choices((1, 2, 3), weights=(25, 40, 35))[0]
    banned = set(heldout)
    while True:
        shapes = rng.sample(SHAPES, n)
        colours = rng.sample(COLOUR_NAMES, n)
        if with_heldout:  # force one held-out pair into a random slot
            colour, shape = rng.choice(heldout)
            k = rng.randrange(n)
            shapes = [s for s in shapes if s != shape][: n - 1]
            colours = [c for c in colours if c != colour][: n - 1]
            shapes.insert(k, shape)
            colours.insert(k, colour)
        elif any(p in banned for p in zip(colours, shapes)):
            continue
        break
    objs = [Obj(s, c, rng.choice(SIZE_NAMES)) for s, c in zip(shapes, colours)]
    while not _try_layout(rng, objs):
        pass
    for o in objs:
        o.rgb = _jitter(rng, COLOURS[o.colour], COLOUR_JITTER)
    base = rng.randint(228, 248)
    background = _jitter(rng, (base, base, base), 6)
    relation = None
    if n == 2:
        i = rng.randrange(2)
        relation = (i, relation_of(objs[i], objs[1 - i]), 1 - i)
    return Scene(objs, background, relation)


# ----------------------------------------------------------------------------------------
# Text about a scene
# ----------------------------------------------------------------------------------------
def caption(scene: Scene) -> str:
    objs = scene.objects
    if len(objs) == 1:
        return objs[0].phrase()
    if len(objs) == 2:
        i, rel, j = scene.relation
        return f"{objs[i].phrase()} {rel} {objs[j].phrase()}"
    left_to_right = sorted(objs, key=lambda o: o.cx)
    return f"{left_to_right[0].phrase()} {left_to_right[1].phrase()} and {left_to_right[2].phrase()}"


QUESTION_KINDS = ("colour", "shape", "size", "count", "relation", "exists_yes", "exists_no")
# Training-only yes/no kinds (attribute_questions): one attribute, the pair the other way round,
# and a pair whose colour and shape are both in the picture on different objects.
CHECK_KINDS = ("has_shape_yes", "has_shape_no", "has_colour_yes", "has_colour_no",
               "is_colour_yes", "is_colour_no", "exists_apart")


def image_questions(scene: Scene, rng: random.Random, heldout: list, allow_heldout: bool) -> list:
    """(question, answer, involves_heldout, kind) tuples, each answer unique given the image.
    The yes/no question about an absent pair never names a held-out pair unless allowed."""
    banned = set(heldout)
    qs = []
    for o in scene.objects:
        hot = (o.colour, o.shape) in banned
        qs.append((f"what colour is the {o.shape}?", o.colour, hot, "colour"))
        qs.append((f"what shape is the {o.colour} one?", o.shape, hot, "shape"))
        qs.append((f"is the {o.shape} big or small?", o.size, hot, "size"))
        qs.append((f"is there a {o.colour} {o.shape}?", "yes", hot, "exists_yes"))
    qs.append(("how many shapes are there?", NUMBERS[len(scene.objects)], False, "count"))
    if scene.relation is not None:
        i, rel, j = scene.relation
        a, b = scene.objects[i], scene.objects[j]
        hot = (a.colour, a.shape) in banned or (b.colour, b.shape) in banned
        qs.append((f"what shape is {rel} the {b.shape}?", a.shape, hot, "relation"))
    absent = [(c, s) for c in COLOUR_NAMES for s in SHAPES
              if (c, s) not in scene.pairs and (allow_heldout or (c, s) not in banned)]
    c, s = rng.choice(absent)
    qs.append((f"is there a {c} {s}?", "no", (c, s) in banned, "exists_no"))
    return qs


def attribute_questions(scene: Scene, rng: random.Random, heldout: list) -> list:
    """Yes/no questions that check attributes one at a time, as image_questions' tuples (training
    only, so the test keeps its kinds). "is there a purple diamond?" about a held-out pair can only be
    answered by checking colour and shape of each object; with every training yes/no naming a seen
    pair, the model learnt the phrases instead (docs/experiments/2026-12-06_stage_e_demo_world_options.md, "Questions that check one
    attribute"). No question names a held-out pair."""
    banned = set(heldout)
    shapes = {o.shape for o in scene.objects}
    colours = {o.colour for o in scene.objects}
    o = rng.choice(scene.objects)
    other_colours = [c for c in COLOUR_NAMES if c != o.colour and (c, o.shape) not in banned]
    qs = [(f"is there a {o.shape}?", "yes", False, "has_shape_yes"),
          (f"is there a {rng.choice([s for s in SHAPES if s not in shapes])}?", "no", False, "has_shape_no"),
          (f"is there a {o.colour} one?", "yes", False, "has_colour_yes"),
          (f"is there a {rng.choice([c for c in COLOUR_NAMES if c not in colours])} one?", "no", False,
           "has_colour_no"),
          (f"is the {o.shape} {o.colour}?", "yes", False, "is_colour_yes"),
          (f"is the {o.shape} {rng.choice(other_colours)}?", "no", False, "is_colour_no")]
    apart = [(a.colour, b.shape) for a in scene.objects for b in scene.objects
             if a is not b and (a.colour, b.shape) not in banned]
    if apart:
        c, s = rng.choice(apart)
        qs.append((f"is there a {c} {s}?", "no", False, "exists_apart"))
    return qs


def question_topic(kind: str) -> str:
    """The accuracy an image question counts towards: its kind, with all yes/no kinds as one."""
    return "yes_no" if kind.startswith("exists") or kind in CHECK_KINDS else kind


# What a user types to get the picture described (answered with its caption).
CAPTION_PROMPTS = ("describe the picture", "describe the image", "what do you see?", "what is in the picture?")


def pick_question(qs: list, rng: random.Random, weights: dict) -> tuple:
    """Choose a question kind first (so answers stay balanced: one "yes" per object would
    otherwise swamp the data), then a question of that kind."""
    kinds = sorted({q[3] for q in qs}, key=(QUESTION_KINDS + CHECK_KINDS).index)
    kind = rng.choices(kinds, weights=[weights[k] for k in kinds])[0]
    return rng.choice([q for q in qs if q[3] == kind])


# ----------------------------------------------------------------------------------------
# World knowledge, arithmetic and chat
# ----------------------------------------------------------------------------------------
COLOUR_FACTS = (("the sky", "blue"), ("the sea", "blue"), ("grass", "green"), ("a leaf", "green"),
                ("a frog", "green"), ("the sun", "yellow"), ("a banana", "yellow"),
                ("a lemon", "yellow"), ("a tomato", "red"), ("a strawberry", "red"),
                ("a cherry", "red"), ("a plum", "purple"), ("a grape", "purple"),
                ("a carrot", "orange"), ("a pumpkin", "orange"))
SHAPE_FACTS = (  # (question, answer, statement)
    ("how many sides does a triangle have", "three", "a triangle has three sides"),
    ("how many sides does a square have", "four", "a square has four sides"),
    ("how many sides does a diamond have", "four", "a diamond has four sides"),
    ("how many points does a star have", "five", "a star has five points"),
    ("how many corners does a circle have", "zero", "a circle has no corners"),
    ("what shape has three sides", "triangle", "the shape with three sides is a triangle"),
    ("what shape has five points", "star", "the shape with five points is a star"),
    ("what shape has no corners", "circle", "the shape with no corners is a circle"),
    ("what shape is round", "circle", "a circle is round"),
)
CHAT = (  # (user, assistant); greetings have no question mark
    ("hello", "hello how can i help"), ("hi", "hi there"), ("good morning", "good morning"),
    ("good night", "good night"), ("how are you?", "i am fine thank you"),
    ("what is your name?", "my name is omni"), ("who are you?", "i am omni a small model"),
    ("thank you", "you are welcome"), ("thanks", "you are welcome"), ("goodbye", "goodbye"),
    ("bye", "bye see you soon"), ("what can you do?", "i can see hear and speak"),
    ("what colours do you know?", "red green blue yellow purple and orange"),
    ("what shapes do you know?", "circle square triangle star and diamond"),
    ("can you count?", "yes"), ("are you a robot?", "i am a small model"),
)


@dataclass(frozen=True)
class Fact:
    question: str          # spoken form, no question mark
    answer: str            # one word
    statement: str
    sum_pair: tuple | None = None  # (a, b) for arithmetic, to apply the hold-out


def knowledge() -> list:
    """Every fact of the world, in a fixed order."""
    facts = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            q = f"what is {NUMBERS[a]} plus {NUMBERS[b]}"
            facts.append(Fact(q, NUMBERS[a + b], f"{NUMBERS[a]} plus {NUMBERS[b]} is {NUMBERS[a + b]}",
                              (min(a, b), max(a, b))))
    for n in range(len(NUMBERS) - 1):
        facts.append(Fact(f"what comes after {NUMBERS[n]}", NUMBERS[n + 1],
                          f"{NUMBERS[n + 1]} comes after {NUMBERS[n]}"))
        facts.append(Fact(f"what comes before {NUMBERS[n + 1]}", NUMBERS[n],
                          f"{NUMBERS[n]} comes before {NUMBERS[n + 1]}"))
    for thing, colour in COLOUR_FACTS:
        facts.append(Fact(f"what colour is {thing}", colour, f"{thing} is {colour}"))
    for q, a, s in SHAPE_FACTS:
        facts.append(Fact(q, a, s))
    return facts


def is_heldout_fact(fact: Fact, heldout_sums: list) -> bool:
    return fact.sum_pair is not None and fact.sum_pair in set(heldout_sums)


def as_question(spoken: str) -> str:
    return spoken + "?"


def spoken(text: str) -> str:
    """Written form -> spoken form: drop the question mark, check the charset."""
    out = " ".join(text.replace("?", " ").split())
    if not SPOKEN_RE.match(out):
        raise ValueError(f"not speakable text: {text!r}")
    return out


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------
def _polygon(o: Obj) -> list:
    cx, cy, h = o.cx, o.cy, o.half
    if o.shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if o.shape == "diamond":  # narrower than tall, so it never looks like a tilted square
        w = round(0.7 * h)
        return [(cx, cy - h), (cx + w, cy), (cx, cy + h), (cx - w, cy)]
    pts = []  # five-pointed star, first point straight up
    for k in range(10):
        r = h if k % 2 == 0 else 0.45 * h
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((round(cx + r * math.cos(ang)), round(cy + r * math.sin(ang))))
    return pts


def render(scene: Scene) -> Image.Image:
    """64x64 RGB image; ImageDraw fills without anti-aliasing, so bytes are reproducible."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        box = [o.cx - o.half, o.cy - o.half, o.cx + o.half, o.cy + o.half]
        if o.shape == "circle":
            draw.ellipse(box, fill=o.rgb)
        elif o.shape == "square":
            draw.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], fill=o.rgb)
        else:
            draw.polygon(_polygon(o), fill=o.rgb)
    return img

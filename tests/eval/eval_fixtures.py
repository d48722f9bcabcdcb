"""Caption fixtures: a few dozen images with 5 references each, candidates that exercise the metrics' edges
(empty, equal to a reference, one word, repeated words, longer and shorter than every reference)."""

from __future__ import annotations

import random

SUBJECTS = ["a man", "a woman", "two dogs", "a black cat", "a group of people", "a little girl", "an old bus"]
VERBS = ["sitting on", "riding", "standing next to", "looking at", "walking along", "parked near", "holding"]
OBJECTS = [
    "a wooden bench",
    "a red surfboard",
    "the beach",
    "a busy street",
    "a large pizza",
    "a tennis racket",
]
EXTRAS = [
    "",
    " in the snow",
    " at night",
    ", smiling.",
    " (on the left).",
    " - it's sunny!",
    ' "happy" today.',
]

TRICKY_CAPTIONS = [
    "A man's dog isn't \"happy\" (really).",
    "Two dogs -- one black, one white -- play in the snow...",
    "The 3.5-year-old child can't see the U.S. flag!",
    "A cat's toy; it's $5.00 & 10% off? Yes: it's 'cheap'.",
    "I'd've gone, won't you? They're here & we'll see.",
    "a  dog   with  tabs\tand stuff",
    "He said, `hello' and ``bye''.",
    "A group of people at the 2nd Ave. station, e.g. N.Y.C. at 5 p.m.",
    "{braces} [brackets] and (parentheses)",
    "state-of-the-art well-known e-mail 1,000,000 people 3/4 cup #tag @home",
    "cannot gonna gotta wanna lemme gimme",
    "Mr. Smith and Mrs. Jones went to St. Louis.",
    "the dogs' bowl and the kids' toys' box",
    "the '90s style, rock 'n' roll, rock'n'roll and 'tis 5 o'clock",
    "don't DON'T Can't CAN'T I'M we're you've he'd she'll",
    'a sign that says "stop." and a sign "go".',
    "a dog. a cat... a bird!! a fish?! a cow?.",
    "a 5'10\" man in a t-shirt, a -5 degree day, a +5 bonus, .5 inch",
    "10:30am 4:30 3.14159 1.000.000 5-10 people 5 - 10 people",
    "x--y a cat-  -a cat --a cat a cat--",
    "a/b c\\d dog;cat dog,cat dog.cat dog:cat",
    "50% off $10 €5 £3 ¥4 ½ cup",
    "a dog's-eye view, don't-care attitude",
    "no. 5 vs. a no. Fig. 3 and fig. b, Pa. and pa. in Calif.",
    "'Cause it's late, y'all, an ol' man's ma'am",
    "a *star* here, a dog_cat, a ~tilde, a dog^2, a dog|cat, a dog+cat=love",
    "café naïve Über",
    "this is a.",
    "",
    "...",
]


def caption_fixture(seed: int = 0) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(references, candidates) as raw (untokenized) captions: 36 images, 5 references each."""
    rng = random.Random(seed)

    def sentence() -> str:
        return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(EXTRAS)}"

    refs = {image: [sentence() for _ in range(5)] for image in range(30)}
    cands = {image: [sentence()] for image in range(30)}
    cands[0] = [""]  # empty candidate
    cands[1] = [refs[1][2]]  # equal to a reference
    cands[2] = ["dog"]  # one word
    cands[3] = ["a a a a a a a a"]  # a repeated word
    cands[4] = ["man man riding riding a a wave"]  # repeated words, some matching
    cands[5] = [" ".join([refs[5][0]] * 3)]  # much longer than every reference
    cands[6] = [refs[6][0].split()[0]]  # much shorter
    cands[7] = ["!!"]  # punctuation only
    for image, caption in zip(range(30, 36), TRICKY_CAPTIONS):
        refs[image] = [caption, *rng.sample(TRICKY_CAPTIONS, 4)]
        cands[image] = [rng.choice(TRICKY_CAPTIONS)]
    refs[8][0] = ""  # an empty reference
    refs[9] = [refs[9][0]] * 5  # identical references
    return refs, cands


# Words and marks for generated captions: what COCO-style captions hold, glued to punctuation the way
# people type it (the generator never glues two words together).
WORDS = (
    "a an the of in with on at near two three people man's woman's dog's girl boy dog cat cats horse giraffe "
    "bus train kite surfboard pizza cake cup it's there's that's isn't aren't doesn't won't can't don't who's "
    "what's she's he's you're we've I've I'll I'm they're we'll she'd couldn't 1 2 3 10 12 100 1,000 1,500 2.5 "
    "3.5 3.75 4:30 9/11 50/50 24/7 1-on-1 5k $20 $5 5% 10% 2nd 21st 1990s '80s '90s 90s Dr. Mr. Mrs. Ms. Jr. vs. "
    "Ave. St. Mt. Co. Inc. U.K. U.S. U.S.A. D.C. N.Y. T.V. TV e.g. i.e. etc. a.m. p.m. w/ w/o 3D 2x4 4x4 "
    "A/C red/blue wi-fi t-shirt x-ray e-mail hot-dog king-size self-portrait black-and-white 3-year-old "
    "well-known up-to-date o'clock O'Brien ma'am y'all rock'n'roll James' kids' Jones's children's cannot gonna"
).split()
TRAILING = [",", ".", "!", "?", ";", ":", "...", "!!", "?!", "'s", "'", ")", '"', "%", "-", ".)", '".', "'."]
LEADING = ["(", '"', "'", "$", "``", "-", "--", "["]  # not "#": CoreNLP reads "#U.S." as a hashtag


def generated_captions(n: int, seed: int = 0) -> list[str]:
    """`n` caption-like lines of random words with punctuation, quotes, brackets and case changes."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = []
        for i in range(rng.randint(2, 16)):
            word = rng.choice(WORDS)
            word = rng.choice(LEADING) + word if rng.random() < 0.1 else word
            word = word + rng.choice(TRAILING) if rng.random() < 0.18 else word
            word = word.upper() if rng.random() < 0.04 else word
            words.append(word[:1].upper() + word[1:] if i == 0 and rng.random() < 0.6 else word)
        line = " ".join(words)
        line = f'"{line}"' if rng.random() < 0.1 else line
        lines.append(line + rng.choice(["", "", ".", ".", "!", "?", " ."]))
    return lines

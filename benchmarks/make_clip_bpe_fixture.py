r"""Ground truth for tests/test_clip_tokenizer.py: open_clip's tokenizer ids for 88 varied texts.

Runs only in a separate virtual environment with open_clip (it imports open_clip, not this repo):

  python3 -m venv /tmp/openclipenv
  /tmp/openclipenv/bin/pip install torch==2.14.1 torchvision==0.29.1
  /tmp/openclipenv/bin/pip install open-clip-torch   # here: open_clip_torch 3.3.0, ftfy 6.3.1
  /tmp/openclipenv/bin/python benchmarks/make_clip_bpe_fixture.py  # tests/data/clip_bpe_tokens.json

For each text and context length L in (77, 16) it stores `open_clip.tokenize([text], L)` (the full
row: [SOT, pieces..., EOT, 0...], truncated to L with the last id forced to EOT) and the number of
pieces `SimpleTokenizer().encode(text)` gives (the row was truncated when pieces + 2 > L).
`needs_ftfy` lists the texts whose ids depend on ftfy's mojibake repair (`fix_encoding`), which the
standard-library cleaning of contrastive/data/clip_tokenizer.py does not do.
"""

import json
import os

import ftfy
import open_clip
from open_clip import tokenizer as oc_tokenizer

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests', 'data',
                   'clip_bpe_tokens.json')
LENGTHS = (77, 16)

LONG = ('a photograph of an astronaut riding a horse on the surface of the moon, highly detailed, '
        'digital art, trending on artstation, dramatic lighting, 8k resolution, by greg rutkowski '
        'and alphonse mucha, concept art, matte painting, sharp focus, octane render, '
        'unreal engine, volumetric fog, golden hour, cinematic composition, award winning '
        'photograph, masterpiece')

TEXTS = [
    # Plain ASCII and capitals.
    'a photo of a cat', 'A PHOTO OF A DOG', 'The Quick Brown Fox Jumps Over The Lazy Dog',
    'hello world', 'x', 'supercalifragilisticexpialidocious', 'antidisestablishmentarianism',
    # Punctuation, numbers, contractions.
    'hello, world!', 'what?!?! no...', 'e-mail: someone@example.com',
    'https://example.com/a_b?c=d&e=f',
    '(parentheses) [brackets] {braces}', 'price: $3.14 / 100%', '2024-01-31 12:45:00',
    '1234567890', 'v1.2.3-rc4', "it's", "IT'S A CAT'S TOY", "we're, they've, i'm, you'll, he'd",
    "don't can't won't", "rock 'n' roll", "'s's 't", 'under_score and snake_case_name',
    '#hashtag @mention ~tilde `backtick`', 'a+b=c; x*y/z', '"quoted" text',
    # Whitespace.
    '', '   ', '  leading and trailing  ', 'tabs\tand\nnewlines\r\nand  multiple   spaces',
    'no\u00a0break\u2003em space\u3000ideographic',
    # Unicode letters, accents, scripts.
    'café', 'cafe\u0301 (decomposed)', 'naïve résumé façade', 'Straße', 'ΟΔΟΣ σοφία', 'İstanbul',
    'Ελληνικά и русский текст', '猫', '一只猫坐在垫子上', '日本語のテキスト', '한국어 문장',
    'العربية', 'हिन्दी', 'ﬁne ﬂour', 'ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ１２３', 'ǅemal', 'x²+y³=z⁴', '½ ¼ ⅓', 'Ⅻ',
    "it'ſ 'ſſ", '\u212a kelvin',
    # Emoji and symbols.
    '😀', 'a 😀 face', '👍🏽 thumbs', '👨‍👩‍👧 family', '🇫🇷 flag', '♥ ★ → ∞', '©®™',
    # Quotes, controls, HTML.
    'it’s “curly” ‘quotes’', 'zero\u200bwidth\u200djoiner', 'bell\x07char\x1bdel\x7f',
    'c1 \x92 control \x85', '\x1b[36mcolored\x1b[0m', 'bom\ufeffinside', 'lone \ud800 surrogate',
    'fish &amp; chips', '&lt;b&gt;bold&lt;/b&gt;', 'it&rsquo;s &quot;fine&quot;', 'P&EACUTE;REZ',
    '&amp;amp;', 'this&not that', '<b>it&rsquo;s</b> html', '&#39;hi&#x27; &#8364;',
    # Mojibake (ftfy repairs it).
    'cafÃ©', 'Ã¢â‚¬Å“mojibakeÃ¢â‚¬Â\x9d',
    # Special-token strings in the text.
    '<start_of_text>', 'a <end_of_text> b', 'x<start_of_text>y', '(<end_of_text>)',
    '<START_OF_TEXT>',
    '<ſtart_of_text> x',
    # Truncation: 14/15 pieces (L=16) and 75/76 pieces (L=77) are the edges; then long text.
    ' '.join(['a'] * 14), ' '.join(['a'] * 15), ' '.join(['a'] * 75), ' '.join(['a'] * 76), LONG,
    LONG + ' ' + LONG.upper(),
]


def main():
  simple = oc_tokenizer.SimpleTokenizer()
  rows = {str(n): open_clip.tokenize(TEXTS, context_length=n).tolist() for n in LENGTHS}
  num_pieces = [len(simple.encode(t)) for t in TEXTS]
  needs_ftfy = [i for i, t in enumerate(TEXTS)
                if ftfy.fix_text(t) != ftfy.fix_text(t, fix_encoding=False)]
  # One id row per line: small (< 100 KB) and readable in a diff.
  lines = ['{', f'  "open_clip": {json.dumps(open_clip.__version__)},',
           f'  "ftfy": {json.dumps(ftfy.__version__)},',
           f'  "texts": {json.dumps(TEXTS)},', f'  "num_pieces": {json.dumps(num_pieces)},',
           f'  "needs_ftfy": {json.dumps(needs_ftfy)},', '  "ids": {']
  for k, (n, r) in enumerate(rows.items()):
    lines.append(f'    "{n}": [')
    lines += [f'      {json.dumps(row)}' + (',' * (i < len(r) - 1)) for i, row in enumerate(r)]
    lines.append('    ]' + (',' if k < len(rows) - 1 else ''))
  lines += ['  }', '}']
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print(f'{len(TEXTS)} texts, needs_ftfy {needs_ftfy}: {os.path.getsize(OUT)} bytes -> {OUT}')


if __name__ == '__main__':
  main()

"""Does the tokenizer release the GIL? The same encoding, 300 calls in one thread, then 300
calls in each of two threads at once (this machine: 2 cores). Run from the repository root:
python bench/results/tokenize_pool_ab_2cores/gil_release.py TOKENIZER_DIR"""

import sys
import threading
import time

from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1])
text = "The quick brown fox jumps over the lazy dog. " * 30  # about 300 tokens
conversation = [{"role": "user", "content": text}]


def loop(fn, n=300):
    for _ in range(n):
        fn()


cases = {
    "tokenizer(text)": lambda: tok(text, add_special_tokens=False),
    "apply_chat_template(tokenize=False)": lambda: tok.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True
    ),
}
for fn in cases.values():
    loop(fn, 100)  # warm
for name, fn in cases.items():
    t0 = time.perf_counter()
    loop(fn)
    one = time.perf_counter() - t0
    threads = [threading.Thread(target=loop, args=(fn,)) for _ in range(2)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    two = time.perf_counter() - t0
    print(f"{name}: one thread {one:.3f} s; two threads, twice the work, {two:.3f} s ({two / one:.2f}x)")

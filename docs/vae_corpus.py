"""Writes the corpus of the README's sentence-VAE run to stdout: the first sentence of the docstring of every
module, class, function and method of the Python standard library that this interpreter can import, kept when
it is 3 to 20 words of plain letters, digits and punctuation; each sentence once, in import order.

    python3 docs/vae_corpus.py > stdlib_docstrings.txt

(The README's run used Debian's Python 3.11.2 in /usr/bin/python3: 3301 sentences.)
"""
import importlib
import inspect
import pkgutil
import re
import sysconfig
import warnings

SKIP = {"test", "idlelib", "tkinter", "turtle", "antigravity", "this", "lib2to3", "ensurepip", "venv", "pydoc_data"}
PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9 ,.;:'()\-]*")


def first_sentence(doc: str):
    paragraph = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    match = re.match(r"(.+?[.!?])(\s|$)", paragraph)
    return match.group(1) if match else None


def members(obj):
    try:
        return [value for _, value in inspect.getmembers(obj)]
    except BaseException:  # some modules import lazily on attribute access and fail
        return []


def main():
    warnings.simplefilter("ignore")
    stdlib = sysconfig.get_paths()["stdlib"]
    names = sorted(m.name for m in pkgutil.iter_modules()
                   if getattr(m.module_finder, "path", "") == stdlib and not m.name.startswith("_")
                   and m.name not in SKIP)
    seen = set()
    for name in names:
        try:
            module = importlib.import_module(name)
        except BaseException:
            continue
        objects = [module]
        for obj in members(module):
            if inspect.isclass(obj) or inspect.isroutine(obj):
                objects.append(obj)
                if inspect.isclass(obj):
                    objects += [m for m in members(obj) if inspect.isroutine(m)]
        for obj in objects:
            doc = getattr(obj, "__doc__", None)
            sentence = first_sentence(doc) if isinstance(doc, str) else None
            if sentence and 3 <= len(sentence.split()) <= 20 and PLAIN.fullmatch(sentence) and sentence not in seen:
                seen.add(sentence)
                print(sentence)


if __name__ == "__main__":
    main()

"""Word lists and line templates for the synthetic Common Crawl generator (written for it, not taken from data).

English words come first in the planted vocabulary so a language identifier reads the planted text as
English; none of them (nor any made-up word) can form a boilerplate phrase a cleaner looks for.
"""

from __future__ import annotations

import numpy as np

ENGLISH = list(dict.fromkeys("""
the of and to a in is that it for was on are with as be at by this have from or had not but what all were when
we there can an your which their said if do will each about how up out them then she many some so these would
other into has more her two like him see time could no make than first been its who now people my made over did
down only way find may water long little very after words called just where most know get through back much
before go good new write our me man too any day same right look think also around another came come work three
word must because does part even place well such here take why things help put years different away again off
went old number great tell men say small every found still between name should home big give air line set own
under read last never us left end along while might next sound below saw something thought both few those
always looked show large often together asked house world going want school important until form food keep
children feet land side without once animals life enough took sometimes four head above kind began almost live
page got earth need far hand high year mother light parts country father let night following picture being
study second eyes soon times story since white days ever paper hard near better best across during today others
however sure means knew try told young miles sun ways thing whole hear example heard several change answer room
sea against top turned learn point city play toward five himself usually""".split()))

_ONSETS = "b c d f g h j k l m n p r s t v w z b d l m n p r s t br dr fr gr pr tr bl cl pl sl st sh ch th".split()
_NUCLEI = "a e i o u a e i o u ai ea ou ee".split()
_CODAS = ["", "", "", "", "n", "r", "s", "t", "l", "m", "nd", "st", "ng"]
_SYLLABLES = [1, 2, 2, 2, 3]
# Substrings a cleaner's boilerplate rules (or a reader) would object to.
_FORBIDDEN = ("javascript", "lorem", "ipsum", "cookie", "policy", "privacy", "fuck", "shit", "cunt", "nig", "fag",
              "sex", "porn", "dick", "cum", "rape")


def vocabulary(size: int, rng: np.random.Generator) -> list[str]:
    """`size` distinct lowercase words by Zipf rank: the English list, then made-up words of 1-3 syllables."""
    words, seen = list(ENGLISH), set(ENGLISH)
    while len(words) < size:
        parts = [(_ONSETS[rng.integers(len(_ONSETS))] + _NUCLEI[rng.integers(len(_NUCLEI))]
                  + _CODAS[rng.integers(len(_CODAS))]) for _ in range(_SYLLABLES[rng.integers(len(_SYLLABLES))])]
        w = "".join(parts)
        if len(w) >= 3 and w not in seen and not any(f in w for f in _FORBIDDEN):
            words.append(w)
            seen.add(w)
    return words


FOREIGN = {
    "fra": """le la les de des du un une et est en que qui dans pour pas sur au avec ce il elle nous vous ils sont plus
    par mais ou comme tout faire bien aussi très leur notre cette être avoir fait peut temps jour monde ville maison
    travail année après avant encore toujours même autre grand petit nouveau premier homme femme enfant pays vie
    histoire eau soir matin""".split(),
    "deu": """der die das und ist nicht ein eine zu den von mit sich des auf für im dem auch es an werden aus er hat
    dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber vor zur bis mehr
    durch man sehr Jahr Zeit Stadt Haus Leben Welt Menschen Arbeit heute immer neue große kleine Kinder""".split(),
    "spa": """el la de que y en los del se las por un para con no una su al es lo como más pero sus le ya o este sí
    porque esta entre cuando muy sin sobre también me hasta hay donde quien desde todo nos durante todos uno les ni
    contra otros ese eso ante ellos día tiempo ciudad casa vida mundo año trabajo gente siempre nuevo grande
    pequeño está están años después información según nuestro había fueron español historia música página
    desarrollo gobierno través mañana niños señor""".split(),
}
FOREIGN_TLD = {"fra": "fr", "deu": "de", "spa": "es"}

# Boilerplate by category. "cookie", "javascript" and "policy" lines pass the minimum-words and
# terminal-punctuation rules, so only their own rule removes them. "nav" and "curly_braces" lines lack terminal
# punctuation: a curly-brace line that had it would make C4 drop the whole page (as "lorem ipsum" does, so that
# phrase only appears on placeholder pages).
BOILERPLATE = {
    "nav": ["Home", "About Us", "Contact", "Menu", "Skip to content", "Search", "Log in", "Sign up", "Categories",
            "Recent Posts", "Share", "Tweet", "Read more", "Back to top", "Facebook", "Twitter", "Newsletter",
            "Archives", "Tags", "Advertisement", "Next article", "Previous article", "Main menu"],
    "cookie": ["This website uses cookies to improve your experience.",
               "We use cookies to ensure that we give you the best experience on our website.",
               "By continuing to browse the site you agree to our use of cookies."],
    "javascript": ["Please enable JavaScript in your browser to view this page.",
                   "JavaScript is disabled in your browser, so some features will not work."],
    "policy": ["Copyright 2024, all rights reserved, see our privacy policy.",
               "By using this site you agree to the terms of use and the privacy policy."],
    "curly_braces": ["body { margin: 0; padding: 0 }", ".site-header { position: sticky; top: 0; z-index: 10 }",
                     "window.dataLayer = window.dataLayer || []; function gtag(){dataLayer.push(arguments);}"],
}

# Placeholder pages: every line holds "lorem ipsum" and passes the minimum-words and punctuation rules.
LOREM = """dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et dolore magna
aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea commodo consequat""".split()

# Lines repeated across pages: they pass every line rule; only line dedup catches them.
REPEATED = (["Thank you for reading, and please share this post", "Sign up for our weekly newsletter and get",
             "Leave a comment below and tell us", "Follow us on social media for", "Subscribe to our channel for"],
            ["with your friends", "with your family", "the latest news", "more stories like this",
             "fresh updates every week", "what you think"],
            [".", "!", " today.", " right now!", " every day."])

SPAM = {"products": ["watches", "handbags", "sunglasses", "sneakers", "jerseys", "phones", "perfume"],
        "lines": ["Buy cheap {p} online at the lowest price today!", "Best {p} deals with free shipping, order now!",
                  "cheap {p} discount {p} sale {p} outlet {p} online", "★★★ {P} ★★★ CLICK HERE ★★★ {P} ★★★",
                  "Top quality {p} for sale, buy {p} now and save big!"]}

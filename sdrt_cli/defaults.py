"""Defaults shared by the library and the command line, each declared once here.

It imports nothing: the commands read it to declare their options before any model code loads.
"""

# prompt positions: the last POS a trace aligns, and the first and last POS an adapter edits (the paper's p)
POS = 5
# the two-step method's budget for step 1, the analysis (`sdrt traces`, `sdrt eval --method cot`)
MAX_NEW_TOKENS_STEP1 = 96
# the built-in prompt pack
PACK = "visual_reasoning"
# passes of `sdrt distill` over the training examples
EPOCHS = 3

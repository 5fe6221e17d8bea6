"""Structured pruning: remove decoder blocks, MLP channels, head groups or experts, re-fit what
remains, and write a smaller dense model with a standard config (issue 12)."""

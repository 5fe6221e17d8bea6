"""Shears' client side: an HTTP client, event following, a server launcher and the demo.

Needs neither torch nor the server's dependencies (httpx and tqdm only).
"""

"""Plot builders: plain data in, a plotly go.Figure out (compare.py, inspector.py, moe.py,
teaching.py).
"""

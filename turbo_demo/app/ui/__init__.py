"""The Gradio page, the only code that imports gradio: page.py composes the tabs (inspector.py,
talk.py, teaching.py), api.py the compare endpoint; menus.py and texts.py are the page's
choices and words.
"""

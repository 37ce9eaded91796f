"""A check shared by the tests of the plots the project writes."""

from __future__ import annotations


def assert_texts_inside(fig):
    """Every drawn title, axis label, tick label and legend of ``fig`` lies inside
    the image (each axes' tight bounding box, which holds exactly those)."""
    if not hasattr(fig.canvas, "get_renderer"):  # a figure closed by pyplot
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
        ext = ax.get_tightbbox(renderer)
        where = ax.get_title() or ax.get_ylabel()
        assert box.x0 - 1 <= ext.x0 and ext.x1 <= box.x1 + 1, (where, ext, box)
        assert box.y0 - 1 <= ext.y0 and ext.y1 <= box.y1 + 1, (where, ext, box)

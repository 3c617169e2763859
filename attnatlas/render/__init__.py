"""Drawing shared by the dashboard, the CLI's exports and compare's report: the grid's rasteriser (numpy and
PIL), the compare layout and the guards that keep untrusted text from being typeset (Bokeh). Reads no atlas
itself: callers pass what to draw."""

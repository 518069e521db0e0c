"""Reports for people: the HTML page kit, diagnostic plots, dataset overviews, sweep and trial reports."""

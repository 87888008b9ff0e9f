// Renders the formulas pymdownx.arithmatex marks (\( \) inline, \[ \] display) with KaTeX, on every page load.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false }
    ]
  });
});

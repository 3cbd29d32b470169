// Live figures: the kernel-free twins of the chapters' widgets (book/live/README.md).
// minimem_tools.bookbuild injects, after a frozen widget, a <div class="mm-live" data-live="chNN">
// and loads _static/vendor/plotly/plotly.min.js, _static/live/chNN.js (which sets
// window.MINIMEM_LIVE.chNN: controls, base figure, one precomputed state per grid point) and
// this file. Moving a control looks the state up and redraws with Plotly.react: nothing is
// computed here, and nothing is fetched.
(function () {
  "use strict";

  function isObject(x) {
    return x !== null && typeof x === "object" && !Array.isArray(x);
  }

  // b laid over a (objects merged key by key, arrays and values replaced)
  function merge(a, b) {
    if (!isObject(a) || !isObject(b)) return b === undefined ? a : b;
    var out = Object.assign({}, a);
    Object.keys(b).forEach(function (k) {
      out[k] = isObject(a[k]) && isObject(b[k]) ? merge(a[k], b[k]) : b[k];
    });
    return out;
  }

  function clone(x) {
    return JSON.parse(JSON.stringify(x)); // Plotly writes into what it is given
  }

  // Colours that follow the page (light or dark theme)
  function themed(layout, element) {
    var style = getComputedStyle(element);
    var axes = {};
    Object.keys(layout).forEach(function (k) {
      if (/^[xy]axis\d*$/.test(k)) {
        axes[k] = { gridcolor: "rgba(128,128,128,0.25)", zerolinecolor: "rgba(128,128,128,0.4)" };
      }
    });
    return merge(
      merge({ paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)", font: { color: style.color } }, axes),
      layout
    );
  }

  function LiveFigure(root, spec) {
    this.root = root;
    this.spec = spec;
    this.index = spec.controls.map(function (c) { return c.default; });
    this.inputs = [];
    this.narrow = null;
    this.build();
    this.render();
  }

  LiveFigure.prototype.valueOf = function (i) {
    var c = this.spec.controls[i];
    return c.values ? c.values[this.index[i]] : this.index[i];
  };

  // the largest position of control i allowed by its max_by control (chapter 2: m <= n)
  LiveFigure.prototype.limit = function (i) {
    var c = this.spec.controls[i];
    if (!c.max_by) return c.labels.length - 1;
    var j = this.spec.controls.findIndex(function (o) { return o.name === c.max_by; });
    var cap = this.valueOf(j), last = 0;
    c.values.forEach(function (v, k) { if (v <= cap) last = k; });
    return last;
  };

  LiveFigure.prototype.build = function () {
    var self = this, box = this.root.querySelector(".mm-live-controls");
    var uid = this.root.id || "mm-live";
    this.spec.controls.forEach(function (c, i) {
      var wrap = document.createElement("div");
      wrap.className = "mm-live-control";
      var label = document.createElement(c.kind === "buttons" ? "span" : "label");
      label.className = "mm-live-label";
      label.textContent = c.name;
      wrap.appendChild(label);
      var id = uid + "-c" + i, input;
      if (c.kind === "slider") {
        input = document.createElement("input");
        input.type = "range";
        input.min = 0;
        input.max = c.labels.length - 1;
        input.step = 1;
        input.value = c.default;
        input.id = id;
        label.htmlFor = id;
        var out = document.createElement("output");
        out.htmlFor = id;
        out.className = "mm-live-value";
        input.addEventListener("input", function () { self.set(i, +input.value); });
        wrap.appendChild(input);
        wrap.appendChild(out);
        input.output = out;
      } else if (c.kind === "select") {
        input = document.createElement("select");
        input.id = id;
        label.htmlFor = id;
        c.labels.forEach(function (text, k) {
          var option = document.createElement("option");
          option.value = k;
          option.textContent = text;
          input.appendChild(option);
        });
        input.value = c.default;
        input.addEventListener("change", function () { self.set(i, +input.value); });
        wrap.appendChild(input);
      } else {
        input = document.createElement("div");
        input.className = "mm-live-buttons";
        input.setAttribute("role", "group");
        input.setAttribute("aria-label", c.name);
        c.labels.forEach(function (text, k) {
          var button = document.createElement("button");
          button.type = "button";
          button.textContent = text;
          button.addEventListener("click", function () { self.set(i, k); });
          input.appendChild(button);
        });
        wrap.appendChild(input);
      }
      input.dataset.control = c.name;
      self.inputs.push(input);
      box.appendChild(wrap);
    });
    this.plot = this.root.querySelector(".mm-live-plot");
    if (window.ResizeObserver) {
      new ResizeObserver(function () {
        if (self.narrow !== self.isNarrow()) self.render();
      }).observe(this.plot);
    }
    new MutationObserver(function () { self.render(); }).observe(document.documentElement, {
      attributes: true,
      attributeFilter: ["data-theme"],
    });
  };

  LiveFigure.prototype.isNarrow = function () {
    return this.plot.clientWidth > 0 && this.plot.clientWidth < 600;
  };

  LiveFigure.prototype.set = function (i, position) {
    this.index[i] = position;
    this.render();
  };

  // The controls show the state; the state's figure and readout are drawn
  LiveFigure.prototype.render = function () {
    var spec = this.spec, self = this;
    spec.controls.forEach(function (c, i) {
      var top = self.limit(i);
      if (self.index[i] > top) self.index[i] = top;
      var input = self.inputs[i];
      if (c.kind === "slider") {
        input.max = top;
        input.value = self.index[i];
        input.output.textContent = c.labels[self.index[i]];
        input.setAttribute("aria-valuetext", c.name + " = " + c.labels[self.index[i]]);
      } else if (c.kind === "select") {
        input.value = self.index[i];
      } else {
        Array.prototype.forEach.call(input.children, function (b, k) {
          b.setAttribute("aria-pressed", k === self.index[i] ? "true" : "false");
        });
      }
    });
    var state = spec.states[this.index.join(",")];
    if (!state) return; // not a point of the grid (cannot happen with max_by honoured)
    this.root.querySelector(".mm-live-readout").innerHTML = state[0]
      .map(function (k) { return spec.pieces[k]; })
      .join("");
    var data = spec.base.map(function (base, k) {
      var p = state[1][k];
      return p < 0 ? merge(base, { visible: false }) : merge(base, spec.patches[p]);
    });
    this.narrow = this.isNarrow();
    var layout = merge(spec.layout, spec.patches[state[2]]);
    if (this.narrow) layout = merge(layout, spec.narrow);
    layout = themed(merge({ height: spec.height, autosize: true }, layout), this.root);
    if (this.narrow) layout.height = spec.narrow.height || spec.height;
    var config = merge(
      { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] },
      spec.config || {}
    );
    window.Plotly.react(this.plot, clone(data), clone(layout), config);
    this.root.dataset.state = this.index.join(",");
  };

  function start() {
    var specs = window.MINIMEM_LIVE || {};
    document.querySelectorAll(".mm-live[data-live]").forEach(function (root) {
      var spec = specs[root.dataset.live];
      if (!spec || !window.Plotly) {
        root.querySelector(".mm-live-readout").textContent = "This live figure could not load its data.";
        return;
      }
      root.liveFigure = new LiveFigure(root, spec);
      root.classList.add("mm-live-ready");
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

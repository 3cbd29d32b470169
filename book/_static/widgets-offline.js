// Loaded on pages with saved widget state, between require.js and embed-amd.js
// (book/_config.yml: nb_ipywidgets_js). Two fixes so that widgets render offline and cleanly:
(function () {
  // 1. The html-manager loads its icon fonts from its own AMD module's folder; map that module
  //    folder to the vendored copy so the fonts come from the build, not from the page's folder.
  var here = document.currentScript.src.split("?")[0];
  var vendor = here.replace(/[^\/]*$/, "") + "vendor/html-manager";
  window.require.config({ paths: { "@jupyter-widgets/html-manager/dist": vendor } });

  // 2. ipywidgets 8 typesets widget labels with the MathJax 2 call MathJax.Hub.Queue; the book
  //    loads MathJax 3, so forward that call to MathJax 3's typesetPromise.
  document.addEventListener("DOMContentLoaded", function () {
    var mj = window.MathJax;
    if (mj && mj.version && !mj.Hub) {
      mj.Hub = {
        Queue: function (job) {
          var element = job[2];
          mj.startup.promise.then(function () { return mj.typesetPromise([element]); });
        },
      };
    }
  });
})();

"""The routing-map page: one self-contained HTML file (inline CSS and JavaScript, no network).

:func:`render_map` takes ``RoutingMap.to_dict()`` and returns the page text. The page shows a
head grid (layers × heads, shaded by total |force|) and a sortable table of the per-head
summaries to pick a head from; the picked head's query × key matrix (routing force by default,
or advantage, attention α, compatibility b) drawn on a canvas with a diverging colour scale whose
sign convention is written beside it; a hover box with α, b, b̄, A and the force of the entry
under the pointer; and the prompt's tokens as a strip coloured by the head's net push per key.

``map.html#L.H`` opens head L.H (``#L.H/pattern``: its attention; also ``advantage``,
``compat``). After drawing, the script sets ``data-drawn="L.H"``, ``data-cells`` (entries drawn) and
``data-nonzero`` (entries with a non-zero value) on ``<body>``: a headless browser's DOM dump
shows that the heat map was drawn.
"""

import html
import json
import math
from typing import Any

__all__ = ["render_map"]

_MATRICES = ("force", "advantage", "pattern", "compat")


def _num(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "null"
    return f"{float(x):.4g}"


def _flat(rows: list) -> str:
    """A nested list of numbers/None as a compact flat JS array literal (4 significant digits)."""
    return "[" + ",".join(_num(x) for row in rows for x in row) + "]"


def _vec(xs: list) -> str:
    return "[" + ",".join(_num(x) for x in xs) + "]"


def render_map(data: dict[str, Any], *, title: str | None = None) -> str:
    """The HTML page of a routing map given as ``RoutingMap.to_dict()``."""
    heads = data["heads"]
    n = len(data["tokens"])
    summary_keys = ("layer", "head", "total_abs_force", "mass_positive", "entropy", "max_abs_push",
                    "top_push_key", "max_value_update", "law_residual")
    parts = []
    for h in heads:
        mats = ",".join(f'"{m}":{_flat(h[m])}' for m in _MATRICES)
        summ = json.dumps({k: h.get(k) for k in summary_keys}, allow_nan=False, default=str)
        parts.append(f'{{"s":{summ},{mats},"bbar":{_vec(h["compat_mean"])},"push":{_vec(h["push"])},'
                     f'"vu":{_vec(h["value_update"])}}}')
    loss = data.get("loss")
    meta = {"tokens": data["tokens"], "token_ids": data["token_ids"], "objective": data.get("objective"),
            "loss": loss if isinstance(loss, float) and math.isfinite(loss) else None, "n": n}
    payload = '{"meta":' + json.dumps(meta) + ',"heads":[' + ",".join(parts) + "]}"
    payload = payload.replace("</", "<\\/")
    name = title or "Routing map"
    prompt = data.get("prompt") or ""
    return (_PAGE.replace("%%TITLE%%", html.escape(name))
            .replace("%%PROMPTLEN%%", str(n))
            .replace("%%PROMPT%%", html.escape(prompt[:400] + ("…" if len(prompt) > 400 else "")))
            .replace("%%DATA%%", payload))


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}
.sub{color:#555;margin-bottom:10px}
.wrap{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
.panel{border:1px solid #ddd;border-radius:6px;padding:10px}
#grid{display:grid;gap:2px;margin-bottom:10px}
#grid div{width:34px;height:26px;font-size:10px;display:flex;align-items:center;justify-content:center;cursor:pointer;border:1px solid #ccc}
#grid div.sel{outline:2px solid #000}
table{border-collapse:collapse;font-size:12px}
th,td{padding:2px 6px;text-align:right;border-bottom:1px solid #eee}
th{cursor:pointer;background:#f5f5f5}
tr.sel td{background:#ffe9a8}
tbody tr{cursor:pointer}
#tip{position:fixed;pointer-events:none;background:#fffff4;border:1px solid #999;padding:6px 8px;font:12px monospace;display:none;white-space:pre;z-index:5}
#strip{font:13px monospace;line-height:1.9;max-width:900px;word-break:break-all}
#strip span{padding:1px 0;border-radius:2px;white-space:pre}
.conv{background:#f7f7fb;border-left:4px solid #5566aa;padding:6px 10px;margin:8px 0;max-width:900px}
canvas{image-rendering:pixelated}
#legend{display:flex;align-items:center;gap:6px;font-size:12px;margin:6px 0}
</style></head>
<body data-drawn="" data-cells="0" data-nonzero="0">
<h1>%%TITLE%%</h1>
<div class="sub" id="sub"></div>
<div class="conv"><b>Sign convention.</b> For query i and key j of one head: α<sub>ij</sub> attention,
b<sub>ij</sub> = u<sub>i</sub>·v<sub>j</sub> = ∂L/∂α<sub>ij</sub>, b̄<sub>i</sub> = Σ<sub>j</sub> α<sub>ij</sub> b<sub>ij</sub>,
advantage A<sub>ij</sub> = b̄<sub>i</sub> − b<sub>ij</sub>, routing force −∂L/∂s<sub>ij</sub> = α<sub>ij</sub> A<sub>ij</sub>.
<span style="color:#b2182b"><b>Red = positive</b></span>: a gradient-descent step <i>raises</i> score s<sub>ij</sub>, so attention of query i
moves <i>toward</i> key j (the key's value lowers the loss more than the current average).
<span style="color:#2166ac"><b>Blue = negative</b></span>: attention moves away. Grey: masked (the query cannot see the key).
The token strip shows each key's net push Σ<sub>i</sub> α<sub>ij</sub>A<sub>ij</sub> (sums to 0 over a head's keys).</div>
<div class="wrap">
<div class="panel"><b>Heads</b> (shade: total |force|; click to pick)<div id="grid"></div>
<table id="tab"><thead><tr>
<th data-k="name">head</th><th data-k="total_abs_force">Σ|force|</th><th data-k="mass_positive">α on A&gt;0</th>
<th data-k="entropy">entropy</th><th data-k="max_abs_push">max|push|</th><th data-k="max_value_update">max‖Δv‖</th><th data-k="law_residual">law resid.</th>
</tr></thead><tbody></tbody></table></div>
<div class="panel"><div>Show: <select id="mode">
<option value="force">routing force −∂L/∂s = αA</option><option value="advantage">advantage A = b̄ − b</option>
<option value="pattern">attention α</option><option value="compat">compatibility b = u·v</option></select>
<label><input type="checkbox" id="sqrt"> signed √ scale</label></div>
<div id="legend"><span id="lmin"></span><canvas id="lbar" width="200" height="12"></canvas><span id="lmax"></span></div>
<div style="font-size:12px;color:#555">rows: query position i · columns: key position j</div>
<canvas id="map" width="600" height="600"></canvas></div>
</div>
<h3>Prompt tokens coloured by net push of the picked head (%%PROMPTLEN%% tokens)</h3>
<div id="strip"></div>
<details><summary>prompt text</summary><pre style="white-space:pre-wrap">%%PROMPT%%</pre></details>
<div id="tip"></div>
<script type="application/json" id="data">%%DATA%%</script>
<script>
(function(){
const D=JSON.parse(document.getElementById('data').textContent);
const M=D.meta,H=D.heads,n=M.n,tok=M.tokens;
let cur=0,sortKey='total_abs_force',sortDesc=true;
const fmt=x=>x===null||x===undefined?'—':(Math.abs(x)>=1e-3&&Math.abs(x)<1e4?(+x).toFixed(4):(+x).toExponential(3));
document.getElementById('sub').textContent=`${n} tokens · objective: ${M.objective}`+(M.loss===null?'':` · loss ${(+M.loss).toFixed(4)}`)+` · ${H.length} heads`;
function div(t,lim,sq){ // diverging: blue (-) white (0) red (+)
  if(t===null)return [235,235,235];
  let x=lim>0?t/lim:0; x=Math.max(-1,Math.min(1,x)); if(sq)x=Math.sign(x)*Math.sqrt(Math.abs(x));
  const a=Math.abs(x), c=x>=0?[178,24,43]:[33,102,172];
  return [255+(c[0]-255)*a,255+(c[1]-255)*a,255+(c[2]-255)*a].map(Math.round);}
function seq(t,sq){ if(t===null)return [235,235,235]; let x=Math.max(0,Math.min(1,t)); if(sq)x=Math.sqrt(x);
  return [255-205*x,255-205*x,255-140*x].map(Math.round);}
function maxAbs(a){let m=0;for(const v of a)if(v!==null&&Math.abs(v)>m)m=Math.abs(v);return m;}
// head grid
const layers=[...new Set(H.map(h=>h.s.layer))].sort((a,b)=>a-b), hmax=Math.max(...H.map(h=>h.s.head))+1;
const grid=document.getElementById('grid'); grid.style.gridTemplateColumns=`repeat(${hmax},36px)`;
const fmaxAll=Math.max(...H.map(h=>h.s.total_abs_force))||1;
const cells=[];
for(const L of layers)for(let h=0;h<hmax;h++){const d=document.createElement('div');const k=H.findIndex(x=>x.s.layer===L&&x.s.head===h);
  if(k<0){d.style.visibility='hidden';}else{const c=seq(H[k].s.total_abs_force/fmaxAll,true);d.style.background=`rgb(${c})`;
  d.style.color=c[0]<140?'#fff':'#000';d.textContent=`${L}.${h}`;d.title=`L${L}H${h} Σ|force| ${fmt(H[k].s.total_abs_force)}`;d.onclick=()=>pick(k);cells[k]=d;}
  grid.appendChild(d);}
// table
const tb=document.querySelector('#tab tbody');
function table(){const idx=H.map((_,i)=>i);const key=sortKey;
  idx.sort((a,b)=>{const va=key==='name'?H[a].s.layer*1000+H[a].s.head:H[a].s[key],vb=key==='name'?H[b].s.layer*1000+H[b].s.head:H[b].s[key];return sortDesc?vb-va:va-vb;});
  tb.innerHTML='';for(const k of idx){const s=H[k].s,tr=document.createElement('tr');if(k===cur)tr.className='sel';
  tr.innerHTML=`<td>${s.layer}.${s.head}</td><td>${fmt(s.total_abs_force)}</td><td>${fmt(s.mass_positive)}</td><td>${fmt(s.entropy)}</td><td>${fmt(s.max_abs_push)}</td><td>${fmt(s.max_value_update)}</td><td>${fmt(s.law_residual)}</td>`;
  tr.onclick=()=>pick(k);tb.appendChild(tr);}}
document.querySelectorAll('#tab th').forEach(th=>th.onclick=()=>{const k=th.dataset.k;if(sortKey===k)sortDesc=!sortDesc;else{sortKey=k;sortDesc=true;}table();});
const cv=document.getElementById('map'),ctx=cv.getContext('2d'),off=document.createElement('canvas');off.width=n;off.height=n;
const cell=Math.max(1,Math.floor(600/n)),size=cell*n;cv.width=size;cv.height=size;
const modeSel=document.getElementById('mode'),sqBox=document.getElementById('sqrt');
function draw(){const h=H[cur],mode=modeSel.value,a=h[mode],sq=sqBox.checked;const img=off.getContext('2d').createImageData(n,n);
  const lim=maxAbs(a);let drawn=0,nz=0;
  for(let i=0;i<n*n;i++){const v=a[i];const c=mode==='pattern'?seq(h.force[i]===null?null:v,sq):div(v,lim,sq);
    img.data[4*i]=c[0];img.data[4*i+1]=c[1];img.data[4*i+2]=c[2];img.data[4*i+3]=255;
    if(h.force[i]!==null){drawn++;if(v!==0)nz++;}}
  off.getContext('2d').putImageData(img,0,0);ctx.imageSmoothingEnabled=false;ctx.clearRect(0,0,size,size);ctx.drawImage(off,0,0,size,size);
  // legend
  const lb=document.getElementById('lbar').getContext('2d');for(let x=0;x<200;x++){const t=mode==='pattern'?x/199:(x/199*2-1)*lim;const c=mode==='pattern'?seq(t,sq):div(t,lim,sq);lb.fillStyle=`rgb(${c})`;lb.fillRect(x,0,1,12);}
  document.getElementById('lmin').textContent=mode==='pattern'?'0':fmt(-lim);document.getElementById('lmax').textContent=mode==='pattern'?'1':fmt(lim);
  // strip
  const st=document.getElementById('strip');st.innerHTML='';const pl=maxAbs(h.push);
  for(let j=0;j<n;j++){const s=document.createElement('span');const c=div(h.push[j],pl,false);s.style.background=`rgb(${c})`;
    s.textContent=tok[j];s.title=`key ${j} ${JSON.stringify(tok[j])}  push ${fmt(h.push[j])}  ‖Δv‖ ${fmt(h.vu[j])}`;st.appendChild(s);}
  document.body.dataset.drawn=`${h.s.layer}.${h.s.head}`;document.body.dataset.scale=sq?'sqrt':'linear';document.body.dataset.cells=drawn;document.body.dataset.nonzero=nz;}
function pick(k){cur=k;cells.forEach((d,i)=>d&&d.classList.toggle('sel',i===k));table();draw();}
modeSel.onchange=draw;sqBox.onchange=draw;
const tip=document.getElementById('tip');
cv.addEventListener('mousemove',e=>{const r=cv.getBoundingClientRect();const j=Math.floor((e.clientX-r.left)/(r.width/n)),i=Math.floor((e.clientY-r.top)/(r.height/n));
  if(i<0||j<0||i>=n||j>=n){tip.style.display='none';return;}const h=H[cur],x=i*n+j;
  tip.textContent=`L${h.s.layer}H${h.s.head}  query ${i} ${JSON.stringify(tok[i])}  key ${j} ${JSON.stringify(tok[j])}\n`+
   (h.force[x]===null?'masked':`α      ${fmt(h.pattern[x])}\nb      ${fmt(h.compat[x])}\nb̄      ${fmt(h.bbar[i])}\nA=b̄−b  ${fmt(h.advantage[x])}\nforce  ${fmt(h.force[x])}  (= −∂L/∂s)`);
  tip.style.display='block';tip.style.left=(e.clientX+14)+'px';tip.style.top=(e.clientY+14)+'px';});
cv.addEventListener('mouseleave',()=>{tip.style.display='none';});
let best=0;H.forEach((h,i)=>{if(h.s.total_abs_force>H[best].s.total_abs_force)best=i;});
// map.html#L.H, #L.H/pattern or #L.H/force/sqrt picks a head (what to show, the √ scale); default: the largest total |force|
const m=/^#(\d+)\.(\d+)(?:\/(\w+))?(\/sqrt)?$/.exec(location.hash);
if(m){const k=H.findIndex(h=>h.s.layer===+m[1]&&h.s.head===+m[2]);if(k>=0)best=k;
  if(m[3]&&[...modeSel.options].some(o=>o.value===m[3]))modeSel.value=m[3];
  if(m[4])sqBox.checked=true;}
pick(best);
})();
</script>
</body></html>
"""

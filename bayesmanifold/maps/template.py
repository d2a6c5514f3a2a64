"""The routing-map page's HTML, CSS and script (filled in by :func:`bayesmanifold.maps.render_map`)."""

__all__ = ["PAGE"]

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>%%TITLE%%</title>
<style>
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}
.sub{color:#555;margin-bottom:10px}
.wrap{display:flex;gap:20px;align-items:flex-start;flex-wrap:wrap}
.panel{border:1px solid #ddd;border-radius:6px;padding:10px}
#grid{display:grid;gap:1px;margin:6px 0 10px}
#grid div{height:16px;font-size:9px;display:flex;align-items:center;justify-content:center;cursor:pointer;border:1px solid #ccc}
#grid div.nomat{border:1px dashed #bbb;opacity:.55}
#grid div.sel{outline:2px solid #000}
#grid span.lab{font-size:9px;color:#777;border:none;cursor:default}
#tabwrap{max-height:360px;overflow-y:auto}
table{border-collapse:collapse;font-size:12px}
th,td{padding:2px 6px;text-align:right;border-bottom:1px solid #eee}
th{cursor:pointer;background:#f5f5f5;position:sticky;top:0}
tr.sel td{background:#ffe9a8}
tbody tr{cursor:pointer}
#tip{position:fixed;pointer-events:none;background:#fffff4;border:1px solid #999;padding:6px 8px;font:12px monospace;display:none;white-space:pre;z-index:5}
#strip{font:13px monospace;line-height:1.9;max-width:1100px;word-break:break-all}
#strip span{padding:1px 0;border-radius:2px;white-space:pre}
.conv{background:#f7f7fb;border-left:4px solid #5566aa;padding:6px 10px;margin:8px 0;max-width:1100px}
canvas{image-rendering:pixelated}
#legend{display:flex;align-items:center;gap:6px;font-size:12px;margin:6px 0}
#msg{color:#a33;font-size:13px;min-height:1em}
</style></head>
<body data-drawn="" data-cells="0" data-nonzero="0" data-draw-ms="">
<h1>%%TITLE%%</h1>
<div class="sub" id="sub"></div>
<div class="conv"><b>Sign convention.</b> For query i and key j of one head: α<sub>ij</sub> attention,
b<sub>ij</sub> = u<sub>i</sub>·v<sub>j</sub> = ∂L/∂α<sub>ij</sub>, b̄<sub>i</sub> = Σ<sub>j</sub> α<sub>ij</sub> b<sub>ij</sub>,
advantage A<sub>ij</sub> = b̄<sub>i</sub> − b<sub>ij</sub>, routing force −∂L/∂s<sub>ij</sub> = α<sub>ij</sub> A<sub>ij</sub>.
<span style="color:#b2182b"><b>Red = positive</b></span>: a gradient-descent step <i>raises</i> score s<sub>ij</sub>, so attention of query i
moves <i>toward</i> key j (the key's value lowers the loss more than the current average).
<span style="color:#2166ac"><b>Blue = negative</b></span>: attention moves away. Grey: masked (the query cannot see the key).
The token strip shows each key's net push Σ<sub>i</sub> α<sub>ij</sub>A<sub>ij</sub> (sums to 0 over a head's keys).
<i>Precision:</i> the page stores α and the force as 8-bit logarithmic codes (±3 % for α ≥ 10<sup>−6</sup>, ±5 % for |force| ≥ 10<sup>−5</sup> of the head's maximum);
A = force/α and b = b̄ − A are derived from them. The exact values are in the map's .npz.</div>
<div class="wrap">
<div class="panel"><b>Heads</b> (rows: layers, columns: heads; click to pick) · shade: <select id="shade"></select>
<div style="font-size:12px;color:#555" id="keptnote"></div>
<div id="grid"></div>
<div id="tabwrap"><table id="tab"><thead><tr id="thr"></tr></thead><tbody></tbody></table></div></div>
<div class="panel"><div>Show: <select id="mode">
<option value="force">routing force −∂L/∂s = αA</option><option value="advantage">advantage A = b̄ − b</option>
<option value="pattern">attention α</option><option value="compat">compatibility b = u·v</option></select>
<label><input type="checkbox" id="sqrt"> signed √ scale</label></div>
<div id="msg"></div>
<div id="legend"><b id="headname"></b><span id="lmin"></span><canvas id="lbar" width="200" height="12"></canvas><span id="lmax"></span></div>
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
const dataEl=document.getElementById('data'),D=JSON.parse(dataEl.textContent);
dataEl.textContent=''; // parsed once: drop the page's largest text node (memory; a DOM dump stays small)
const M=D.meta,R=D.rows,MATS=D.mats,n=M.n,tok=M.tokens;
const name=r=>`${r.layer}.${r.head}`;
let cur=null,sortKey=M.shade,sortDesc=true,shadeKey=M.shade,cache={},want=0;
const fmt=x=>x===null||x===undefined?'—':(Math.abs(x)>=1e-3&&Math.abs(x)<1e4?(+x).toFixed(4):(+x).toExponential(3));
const kept=R.filter(r=>r.kept).length;
document.getElementById('sub').textContent=`${n} tokens · objective: ${M.objective}`+(M.loss===null?'':` · loss ${(+M.loss).toFixed(4)}`)+` · ${R.length} heads measured, matrices of ${kept}`;
document.getElementById('keptnote').textContent=kept<R.length?`dashed: summaries only (the page keeps the matrices of the top ${kept} by ${M.shades[M.by]||M.by})`:'';
// decoding tables (maps/encoding.py): α code c>0 -> 10^(-AD(255-c)/254); force 1..127 +, 128..254 −, 255 masked
const AL=new Float64Array(256),FM=new Float64Array(256);
for(let c=1;c<256;c++)AL[c]=Math.pow(10,-M.alpha_decades*(255-c)/254);
for(let c=1;c<255;c++)FM[c]=c<=127?Math.pow(10,-M.force_decades*(127-c)/126):-Math.pow(10,-M.force_decades*(c-128)/126);
async function load(key){ // inflate one head's block only when it is picked
  if(cache[key])return cache[key];const m=MATS[key];
  const bin=Uint8Array.from(atob(m.z),c=>c.charCodeAt(0));
  const buf=await new Response(new Blob([bin]).stream().pipeThrough(new DecompressionStream('deflate'))).arrayBuffer();
  const codes=new Uint8Array(buf),N=n*n,a=new Float32Array(N),f=new Float32Array(N),adv=new Float32Array(N),b=new Float32Array(N);
  for(let i=0;i<N;i++){const ca=codes[i],cf=codes[N+i];
    if(cf===255){a[i]=0;f[i]=NaN;adv[i]=NaN;b[i]=NaN;continue;}
    a[i]=AL[ca];f[i]=FM[cf]*m.fmax;adv[i]=a[i]>0?f[i]/a[i]:NaN;b[i]=m.bbar[Math.floor(i/n)]-adv[i];}
  return cache[key]={force:f,pattern:a,advantage:adv,compat:b,bbar:m.bbar,push:m.push,vu:m.vu};}
function div(t,lim,sq){ // diverging: blue (-) white (0) red (+)
  if(t===null||Number.isNaN(t))return [235,235,235];
  let x=lim>0?t/lim:0; x=Math.max(-1,Math.min(1,x)); if(sq)x=Math.sign(x)*Math.sqrt(Math.abs(x));
  const a=Math.abs(x), c=x>=0?[178,24,43]:[33,102,172];
  return [255+(c[0]-255)*a,255+(c[1]-255)*a,255+(c[2]-255)*a].map(Math.round);}
function seq(t,sq){ if(t===null||Number.isNaN(t))return [235,235,235]; let x=Math.max(0,Math.min(1,t)); if(sq)x=Math.sqrt(x);
  return [255-205*x,255-205*x,255-140*x].map(Math.round);}
function maxAbs(a){let m=0;for(const v of a)if(v!==null&&Math.abs(v)>m)m=Math.abs(v);return m;}
// shade menu and grid: every measured head, n_layers rows × n_heads columns
const shadeSel=document.getElementById('shade');
for(const [k,lab] of Object.entries(M.shades)){const o=document.createElement('option');o.value=k;o.textContent=lab;shadeSel.appendChild(o);}
shadeSel.value=shadeKey;
const grid=document.getElementById('grid');grid.style.gridTemplateColumns=`22px repeat(${M.n_heads},30px)`;
const byName={};R.forEach((r,i)=>byName[name(r)]=i);const cells={};
for(let L=0;L<M.n_layers;L++){const lab=document.createElement('span');lab.className='lab';lab.textContent=L;grid.appendChild(lab);
  for(let h=0;h<M.n_heads;h++){const d=document.createElement('div'),key=`${L}.${h}`;
    if(!(key in byName)){d.style.visibility='hidden';}else{d.textContent=h;d.onclick=()=>pick(key);cells[key]=d;if(!R[byName[key]].kept)d.classList.add('nomat');}
    grid.appendChild(d);}}
function shade(){shadeKey=shadeSel.value;const vals=R.map(r=>r[shadeKey]).filter(v=>v!==null&&Number.isFinite(v));
  const lo=Math.min(...vals),hi=Math.max(...vals);
  for(const r of R){const d=cells[name(r)],v=r[shadeKey];const t=v===null||hi===lo?null:(v-lo)/(hi-lo);const c=seq(t,false);
    d.style.background=`rgb(${c})`;d.style.color=c[0]<140?'#fff':'#000';d.title=`L${r.layer}H${r.head} ${M.shades[shadeKey]} ${fmt(v)}`+(r.kept?'':' (summaries only)');}}
shadeSel.onchange=()=>{shade();sortKey=shadeKey;sortDesc=true;table();}; // the table follows the shade
// table
const cols=[['name','head'],...Object.entries(M.shades)];
document.getElementById('thr').innerHTML=cols.map(([k,l])=>`<th data-k="${k}">${l}</th>`).join('');
const tb=document.querySelector('#tab tbody');
function table(){const idx=R.map((_,i)=>i);const key=sortKey;const val=i=>key==='name'?-(R[i].layer*1000+R[i].head):(R[i][key]===null?-Infinity:R[i][key]);
  idx.sort((a,b)=>sortDesc?val(b)-val(a):val(a)-val(b));
  tb.innerHTML=idx.map(i=>{const r=R[i];return `<tr data-k="${name(r)}"${name(r)===cur?' class="sel"':''}><td>${name(r)}${r.kept?'':'*'}</td>`+cols.slice(1).map(([k])=>`<td>${fmt(r[k])}</td>`).join('')+'</tr>';}).join('');}
tb.onclick=e=>{const tr=e.target.closest('tr');if(tr)pick(tr.dataset.k);};
document.querySelectorAll('#tab th').forEach(th=>th.onclick=()=>{const k=th.dataset.k;if(sortKey===k)sortDesc=!sortDesc;else{sortKey=k;sortDesc=true;}table();});
const cv=document.getElementById('map'),ctx=cv.getContext('2d'),off=document.createElement('canvas');off.width=n;off.height=n;
const cell=Math.max(1,Math.floor(600/n)),size=cell*n;cv.width=size;cv.height=size;
const modeSel=document.getElementById('mode'),sqBox=document.getElementById('sqrt'),msg=document.getElementById('msg');
async function draw(){if(cur===null||!MATS[cur])return;const ticket=++want;const h=await load(cur);if(ticket!==want)return;
  const mode=modeSel.value,a=h[mode],sq=sqBox.checked,img=off.getContext('2d').createImageData(n,n);
  const lim=maxAbs(a);let drawn=0,nz=0;
  for(let i=0;i<n*n;i++){const v=a[i],masked=Number.isNaN(h.force[i]);const c=mode==='pattern'?seq(masked?null:v,sq):div(v,lim,sq);
    img.data[4*i]=c[0];img.data[4*i+1]=c[1];img.data[4*i+2]=c[2];img.data[4*i+3]=255;
    if(!masked){drawn++;if(v!==0)nz++;}}
  off.getContext('2d').putImageData(img,0,0);ctx.imageSmoothingEnabled=false;ctx.clearRect(0,0,size,size);ctx.drawImage(off,0,0,size,size);
  const lb=document.getElementById('lbar').getContext('2d');for(let x=0;x<200;x++){const t=mode==='pattern'?x/199:(x/199*2-1)*lim;const c=mode==='pattern'?seq(t,sq):div(t,lim,sq);lb.fillStyle=`rgb(${c})`;lb.fillRect(x,0,1,12);}
  document.getElementById('lmin').textContent=mode==='pattern'?'0':fmt(-lim);document.getElementById('lmax').textContent=mode==='pattern'?'1':fmt(lim);
  document.getElementById('headname').textContent=`head ${cur}`;
  const st=document.getElementById('strip');st.innerHTML='';const pl=maxAbs(h.push);
  for(let j=0;j<n;j++){const s=document.createElement('span');const c=div(h.push[j],pl,false);s.style.background=`rgb(${c})`;
    s.textContent=tok[j];s.title=`key ${j} ${JSON.stringify(tok[j])}  push ${fmt(h.push[j])}  ‖Δv‖ ${fmt(h.vu[j])}`;st.appendChild(s);}
  const B=document.body.dataset;B.drawn=cur;B.scale=sq?'sqrt':'linear';B.cells=drawn;B.nonzero=nz;if(!B.drawMs)B.drawMs=Math.round(performance.now());}
function pick(key){if(!MATS[key]){msg.textContent=`head ${key}: summaries only; this page keeps the matrices of ${kept} heads (map it with --heads ${key} or a larger --top)`;return;}
  msg.textContent='';cur=key;Object.entries(cells).forEach(([k,d])=>d.classList.toggle('sel',k===key));table();draw();}
modeSel.onchange=draw;sqBox.onchange=draw;
const tip=document.getElementById('tip');
cv.addEventListener('mousemove',e=>{const h=cache[cur];const r=cv.getBoundingClientRect();const j=Math.floor((e.clientX-r.left)/(r.width/n)),i=Math.floor((e.clientY-r.top)/(r.height/n));
  if(!h||i<0||j<0||i>=n||j>=n){tip.style.display='none';return;}const x=i*n+j;
  tip.textContent=`L${cur.replace('.','H')}  query ${i} ${JSON.stringify(tok[i])}  key ${j} ${JSON.stringify(tok[j])}\n`+
   (Number.isNaN(h.force[x])?'masked':`α      ≈ ${fmt(h.pattern[x])}\nb      ≈ ${fmt(h.compat[x])}\nb̄      ${fmt(h.bbar[i])}\nA=b̄−b  ≈ ${fmt(h.advantage[x])}\nforce  ≈ ${fmt(h.force[x])}  (= −∂L/∂s)`);
  tip.style.display='block';tip.style.left=(e.clientX+14)+'px';tip.style.top=(e.clientY+14)+'px';});
cv.addEventListener('mouseleave',()=>{tip.style.display='none';});
shade();table();
// map.html#L.H, #L.H/pattern or #L.H/force/sqrt picks a head (what to show, the √ scale); default: the kept head
// with the largest summary the heads were kept by (total |force| unless --by says otherwise)
const rank=r=>r[M.by||'total_abs_force']??-Infinity;
let best=null;for(const r of R)if(r.kept&&(best===null||rank(r)>rank(R[byName[best]])))best=name(r);
const m=/^#(\d+\.\d+)(?:\/(\w+))?(\/sqrt)?$/.exec(location.hash);
if(m){if(MATS[m[1]])best=m[1];if(m[2]&&[...modeSel.options].some(o=>o.value===m[2]))modeSel.value=m[2];if(m[3])sqBox.checked=true;}
if(best!==null)pick(best);
})();
</script>
</body></html>
"""

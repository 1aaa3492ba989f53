package driver

import (
	"encoding/xml"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestLibvirtStyle: the layout and escaping libvirt prints.
func TestLibvirtStyle(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`<domainsnapshot><name>s1</name><memory snapshot="no"></memory><disks><disk name="vda" snapshot="external"><source file="/a/b"></source></disk></disks></domainsnapshot>`,
			"<domainsnapshot>\n  <name>s1</name>\n  <memory snapshot='no'/>\n  <disks>\n    <disk name='vda' snapshot='external'>\n      <source file='/a/b'/>\n    </disk>\n  </disks>\n</domainsnapshot>"},
		{`<?xml version="1.0"?>` + "\n" + `<a x="it's &quot;q&quot; &lt;&gt; &amp;">a &lt;b&gt; &amp; c'd"e</a>`,
			`<a x='it&apos;s &quot;q&quot; &lt;&gt; &amp;'>a &lt;b&gt; &amp; c&apos;d&quot;e</a>`},
		// Mixed content stays as it was; whitespace-only text is text.
		{"<a><b>x <i>y</i> z</b><c>  </c></a>", "<a>\n  <b>x <i>y</i> z</b>\n  <c>  </c>\n</a>"},
		{"<a>\n\t<!-- note -->\n\t<b/>\n</a>", "<a>\n  <!-- note -->\n  <b/>\n</a>"},
		{`<a v="l1&#10;l2&#9;&#13;"><![CDATA[<raw>]]></a>`, `<a v='l1&#10;l2&#9;&#13;'>&lt;raw&gt;</a>`},
		{`<q:a xmlns:q="urn:x" q:v="1"><q:b/></q:a>`, "<q:a xmlns:q='urn:x' q:v='1'>\n  <q:b/>\n</q:a>"},
		// libvirt's attribute order for a snapshot's disk, there only.
		{`<domainsnapshot><disks><disk type="file" x="1" snapshot="external" name="vda"/></disks><disk type="file" name="a"/></domainsnapshot>`,
			"<domainsnapshot>\n  <disks>\n    <disk name='vda' snapshot='external' type='file' x='1'/>\n  </disks>\n  <disk type='file' name='a'/>\n</domainsnapshot>"},
	} {
		got, err := libvirtStyle(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("libvirtStyle(%q) =\n%s (%v)\nwant\n%s", tc.in, got, err, tc.want)
		}
	}
	for _, bad := range []string{"", "<a>", "<a></b>", "<a/><b/>", "text<a/>", "<!DOCTYPE a><a/>", "<a><?pi x?></a>", "<a>&undefined;</a>"} {
		if got, err := libvirtStyle(bad); err == nil {
			t.Errorf("libvirtStyle(%q) = %q, want an error", bad, got)
		}
	}
}

// TestLibvirtStyleOracle formats what libvirt itself printed (virsh
// snapshot-dumpxml over the test driver: escaped description, self-closing
// memory and disks, the nested domain, a parent) and must give it back
// byte for byte; encoding/xml's rendering of the
// same document must not, or the comparison could not fail.
func TestLibvirtStyleOracle(t *testing.T) {
	if _, err := exec.LookPath("virsh"); err != nil {
		t.Skip("virsh (libvirt-clients) is not installed")
	}
	out, err := exec.Command("virsh", "-q", "-c", "test:///default",
		`snapshot-create-as test s1 "it's <1> & \"2\""; snapshot-create-as test s2; snapshot-dumpxml test s1; snapshot-dumpxml test s2`).CombinedOutput()
	if err != nil {
		t.Fatalf("virsh: %v\n%s", err, out)
	}
	var docs []string
	for _, part := range strings.SplitAfter(string(out), "</domainsnapshot>\n") {
		if i := strings.Index(part, "<domainsnapshot>"); i >= 0 {
			docs = append(docs, strings.TrimSuffix(part[i:], "\n"))
		}
	}
	if len(docs) != 2 {
		t.Fatalf("virsh printed %d documents:\n%s", len(docs), out)
	}
	for _, doc := range docs {
		got, err := libvirtStyle(doc)
		if err != nil || got != doc {
			t.Errorf("libvirt printed\n%s\nthe formatter gives\n%s (%v)", doc, got, err)
		}
		goStyle, err := libvirtStyle(doc)
		if err == nil {
			goStyle = strings.ReplaceAll(goStyle, "'", `"`)
		}
		if goStyle == doc {
			t.Errorf("the oracle cannot tell another quoting from libvirt's")
		}
	}
}

// FuzzLibvirtStyle: whatever document the formatter accepts, its output
// parses back to the same tokens (indentation aside; a snapshot's own
// children in libvirt's order, which the golden and oracle tests fix)
// and formats to itself.
func FuzzLibvirtStyle(f *testing.F) {
	for _, seed := range []string{
		"<domainsnapshot><name>s</name><memory snapshot='no'/></domainsnapshot>",
		"<a x='&apos;&quot;'>t<b/>u</a>",
		"<a>\r\n<b v='\t'/></a>",
		"<domainsnapshot><disks><disk type='file' snapshot='no' name='vda'/></disks></domainsnapshot>",
	} {
		f.Add(seed)
	}
	golden, _ := filepath.Glob("testdata/redefine/*.golden")
	for _, g := range golden {
		if b, err := os.ReadFile(g); err == nil {
			f.Add(string(b))
		}
	}
	f.Fuzz(func(t *testing.T, doc string) {
		out, err := libvirtStyle(doc)
		if err != nil {
			return
		}
		want, err := tokens(doc)
		if err != nil {
			t.Fatalf("accepted %q that does not tokenize: %v", doc, err)
		}
		got, err := tokens(out)
		if err != nil {
			t.Fatalf("output %q of %q does not parse: %v", out, doc, err)
		}
		if rootChildrenSorted(got) != rootChildrenSorted(want) {
			t.Fatalf("tokens of %q:\n%q\nbecame, through %q:\n%q", doc, want, out, got)
		}
		if again, err := libvirtStyle(out); err != nil || again != out {
			t.Fatalf("formatting %q again gave %q (%v)", out, again, err)
		}
	})
}

// rootChildrenSorted is a token stream as one string, with the children
// of a <domainsnapshot> root (each with all it holds) sorted: the
// formatter puts those in libvirt's order.
func rootChildrenSorted(toks []string) string {
	if len(toks) < 2 || !strings.HasPrefix(toks[0], "start:domainsnapshot ") {
		return strings.Join(toks, "\x00")
	}
	var kids []string
	depth, start := 0, 1
	for i := 1; i < len(toks)-1; i++ {
		switch {
		case strings.HasPrefix(toks[i], "start:"):
			depth++
		case strings.HasPrefix(toks[i], "end:"):
			depth--
		}
		if depth == 0 {
			kids = append(kids, strings.Join(toks[start:i+1], "\x00"))
			start = i + 1
		}
	}
	slices.Sort(kids)
	return toks[0] + "\x01" + strings.Join(kids, "\x01") + "\x01" + toks[len(toks)-1]
}

// tokens is a document's token stream as text, without whitespace-only
// text (indentation), adjacent text joined, attributes sorted, and
// without the XML declaration.
func tokens(doc string) ([]string, error) {
	dec := xml.NewDecoder(strings.NewReader(doc))
	var out []string
	text := ""
	flush := func() {
		if strings.TrimSpace(text) != "" {
			out = append(out, "text:"+text)
		}
		text = ""
	}
	for {
		tok, err := dec.RawToken()
		if errors.Is(err, io.EOF) {
			flush()
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		switch t := tok.(type) {
		case xml.CharData:
			text += string(t)
			continue
		case xml.StartElement:
			flush()
			var attrs []string
			for _, a := range t.Attr {
				attrs = append(attrs, qualified(a.Name)+"="+a.Value)
			}
			slices.Sort(attrs) // their order means nothing to XML
			out = append(out, "start:"+qualified(t.Name)+" "+strings.Join(attrs, "\x01"))
		case xml.EndElement:
			flush()
			out = append(out, "end:"+qualified(t.Name))
		case xml.Comment:
			flush()
			out = append(out, "comment:"+string(t))
		case xml.ProcInst:
			if t.Target != "xml" {
				out = append(out, "pi:"+t.Target)
			}
		}
	}
}

package driver

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/xlsnap/xlsnap/errdefs"
)

// libvirtStyle rewrites an XML document as libvirt prints its own
// (virXMLFormatElement over virBuffer): single-quoted attributes,
// self-closing empty elements, two spaces of indentation per level, and
// the five characters virBufferEscapeString escapes written as &lt; &gt;
// &amp; &apos; &quot; in text and attributes alike. Scripts written
// against virsh grep for snapshot='external'; encoding/xml's own output
// (double quotes, <a></a>) would not match.
//
// An element whose content mixes text with elements keeps that content
// exactly as it is, as libxml2's formatter does; whitespace between
// elements is indentation and is replaced. The document must be one
// element with at most an XML declaration (dropped, as libvirt prints
// none), comments and whitespace around it; DTDs and processing
// instructions, which libvirt never prints, are refused as ErrInternal,
// as is anything that is not well-formed: the input is always xlsnap's
// own output.
func libvirtStyle(doc string) (string, error) {
	return format(doc, true)
}

// HideSecrets is doc, a domain or domain snapshot document, in libvirt's
// layout without what libvirt prints only under VIR_DOMAIN_XML_SECURE
// (VIR_DOMAIN_SNAPSHOT_XML_SECURE): a <graphics> element's passwd and
// passwdValidTo (virDomainGraphicsDefFormat). A front that answers
// libvirt's XML calls uses it for every caller that did not ask, and
// may ask, for secure XML. Errors: ErrInternal (1) for a document that
// is not well-formed.
func HideSecrets(doc string) (string, error) {
	return format(doc, false)
}

// format lays doc out as libvirtStyle says, with the secrets when secure.
func format(doc string, secure bool) (string, error) {
	root, err := parseNodes(doc)
	if err != nil {
		return "", fmt.Errorf("%w: formatting XML: %w", errdefs.ErrInternal, err)
	}
	if !secure {
		hideSecrets(root)
	}
	var b strings.Builder
	for _, n := range root.kids {
		writeNode(&b, n, 0, "")
		b.WriteByte('\n')
	}
	return strings.TrimSuffix(b.String(), "\n"), nil
}

// hideSecrets drops the attributes libvirt prints only in secure XML.
func hideSecrets(n *node) {
	if n.kind == elementNode && n.name == "graphics" {
		n.attrs = slices.DeleteFunc(n.attrs, func(a xml.Attr) bool {
			return a.Name.Space == "" && (a.Name.Local == "passwd" || a.Name.Local == "passwdValidTo")
		})
	}
	for _, k := range n.kids {
		hideSecrets(k)
	}
}

// node is an element, a run of text or a comment.
type node struct {
	kind  nodeKind
	name  string     // element: prefix:local as written
	attrs []xml.Attr // element
	text  string     // text or comment
	kids  []*node
}

type nodeKind int

const (
	elementNode nodeKind = iota
	textNode
	commentNode
)

// parseNodes reads doc into a tree under a synthetic root. RawToken keeps
// namespace prefixes as written; end tags are matched here, as RawToken
// does not.
func parseNodes(doc string) (*node, error) {
	dec := xml.NewDecoder(strings.NewReader(doc))
	dec.Strict = true
	root := &node{kind: elementNode}
	stack := []*node{root}
	elements := 0
	for {
		tok, err := dec.RawToken()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		top := stack[len(stack)-1]
		switch t := tok.(type) {
		case xml.StartElement:
			if len(stack) == 1 {
				if elements++; elements > 1 {
					return nil, errors.New("more than one root element")
				}
			}
			n := &node{kind: elementNode, name: qualified(t.Name), attrs: t.Attr}
			top.kids = append(top.kids, n)
			stack = append(stack, n)
		case xml.EndElement:
			if len(stack) == 1 || top.name != qualified(t.Name) {
				return nil, fmt.Errorf("unexpected end element </%s>", qualified(t.Name))
			}
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) == 1 {
				if strings.TrimSpace(string(t)) != "" {
					return nil, errors.New("text outside the root element")
				}
				continue
			}
			if k := len(top.kids); k > 0 && top.kids[k-1].kind == textNode {
				top.kids[k-1].text += string(t) // CDATA next to text
				continue
			}
			top.kids = append(top.kids, &node{kind: textNode, text: string(t)})
		case xml.Comment:
			top.kids = append(top.kids, &node{kind: commentNode, text: string(t)})
		case xml.ProcInst:
			if t.Target != "xml" || len(stack) > 1 || elements > 0 {
				return nil, fmt.Errorf("processing instruction <?%s?>", t.Target)
			}
		case xml.Directive:
			return nil, errors.New("DTD declaration")
		}
	}
	if len(stack) != 1 || elements != 1 {
		return nil, errors.New("not one complete root element")
	}
	return root, nil
}

func qualified(n xml.Name) string {
	if n.Space == "" {
		return n.Local
	}
	return n.Space + ":" + n.Local
}

// attrOrder is libvirt's attribute order where encoding/xml's (libvirtxml's
// struct order) differs, by element path: a snapshot's disk is
// <disk name='vda' snapshot='external' type='file'>
// (virDomainSnapshotDiskDefFormat), which scripts match as a whole.
var attrOrder = map[string][]string{
	"/domainsnapshot/disks/disk": {"name", "snapshot", "type"},
}

// childOrder is libvirt's order of child elements where libvirtxml's
// differs: a snapshot's <parent> comes before its <creationTime>
// (virDomainSnapshotDefFormatInternal).
var childOrder = map[string][]string{
	"/domainsnapshot": {"name", "description", "state", "parent", "creationTime",
		"memory", "disks", "domain", "inactiveDomain", "cookie", "active"},
}

// orderedKids is n's children in libvirt's order at path: the elements
// the order names first, in that order, then the rest as they were.
func orderedKids(path string, kids []*node) []*node {
	order, ok := childOrder[path]
	if !ok {
		return kids
	}
	out := make([]*node, 0, len(kids))
	for _, name := range order {
		for _, k := range kids {
			if k.kind == elementNode && k.name == name {
				out = append(out, k)
			}
		}
	}
	for _, k := range kids {
		if k.kind != elementNode || !slices.Contains(order, k.name) {
			out = append(out, k)
		}
	}
	return out
}

// ordered is attrs in the order libvirt prints them at path; attributes
// the order does not name keep theirs, after those it names.
func ordered(path string, attrs []xml.Attr) []xml.Attr {
	order, ok := attrOrder[path]
	if !ok {
		return attrs
	}
	out := make([]xml.Attr, 0, len(attrs))
	for _, name := range order {
		for _, a := range attrs {
			if a.Name.Space == "" && a.Name.Local == name {
				out = append(out, a)
			}
		}
	}
	for _, a := range attrs {
		if a.Name.Space != "" || !slices.Contains(order, a.Name.Local) {
			out = append(out, a)
		}
	}
	return out
}

// writeNode writes n at the given depth (the caller has indented it);
// parent is the path of the element it is in.
func writeNode(b *strings.Builder, n *node, depth int, parent string) {
	switch n.kind {
	case textNode:
		escapeTo(b, n.text, false)
		return
	case commentNode:
		b.WriteString("<!--" + n.text + "-->")
		return
	}
	path := parent + "/" + n.name
	b.WriteString("<" + n.name)
	for _, a := range ordered(path, n.attrs) {
		b.WriteString(" " + qualified(a.Name) + "='")
		escapeTo(b, a.Value, true)
		b.WriteByte('\'')
	}
	if len(n.kids) == 0 {
		b.WriteString("/>")
		return
	}
	b.WriteByte('>')
	if indented(n) {
		for _, k := range orderedKids(path, n.kids) {
			if k.kind == textNode {
				continue // whitespace between elements: indentation
			}
			b.WriteString("\n" + strings.Repeat("  ", depth+1))
			writeNode(b, k, depth+1, path)
		}
		b.WriteString("\n" + strings.Repeat("  ", depth))
	} else {
		for _, k := range n.kids {
			writeNode(b, k, depth, path)
		}
	}
	b.WriteString("</" + n.name + ">")
}

// indented says n's content is elements (and comments) with at most
// whitespace between them, which libvirt puts one per line.
func indented(n *node) bool {
	structured := false
	for _, k := range n.kids {
		switch {
		case k.kind != textNode:
			structured = true
		case strings.TrimLeft(k.text, " \t\r\n") != "":
			return false
		}
	}
	return structured
}

// escapeTo writes s escaped as virBufferEscapeString escapes it; in an
// attribute, line ends and tabs also become character references, which
// a parser would otherwise normalise to spaces, and in text a carriage
// return, which it would turn into a line feed.
func escapeTo(b *strings.Builder, s string, attr bool) {
	for _, r := range s {
		switch {
		case r == '<':
			b.WriteString("&lt;")
		case r == '>':
			b.WriteString("&gt;")
		case r == '&':
			b.WriteString("&amp;")
		case r == '\'':
			b.WriteString("&apos;")
		case r == '"':
			b.WriteString("&quot;")
		case r == '\r':
			b.WriteString("&#13;")
		case attr && r == '\n':
			b.WriteString("&#10;")
		case attr && r == '\t':
			b.WriteString("&#9;")
		default:
			b.WriteRune(r)
		}
	}
}
